"""The masker on its own: Kubernetes objects wherever the API puts them."""

from __future__ import annotations

import json

import pytest

from addons.engine.masks import LAST_APPLIED, Masker, Report, parse, parse_all

SECRET = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "db"}, "data": {"password": "aHVudGVyMg=="},
          "stringData": {"token": "plain"}, "type": "Opaque"}
ITEM = {k: v for k, v in SECRET.items() if k not in ("kind", "apiVersion")}
MASKED_DATA = {"password": "[REDACTED]"}


def mask(doc, *masks):
    report = Report()
    return Masker(parse_all(masks or ("kubernetes-secrets",)), None, b"k").document(doc, report), report


@pytest.mark.parametrize(
    "doc, where",
    [
        (SECRET, lambda d: d["data"]),
        ({"kind": "SecretList", "apiVersion": "v1", "items": [ITEM]}, lambda d: d["items"][0]["data"]),
        ({"kind": "List", "items": [SECRET]}, lambda d: d["items"][0]["data"]),
        ({"type": "ADDED", "object": SECRET}, lambda d: d["object"]["data"]),
        ({"kind": "Table", "rows": [{"cells": ["db"], "object": SECRET}]}, lambda d: d["rows"][0]["object"]["data"]),
    ],
)
def test_secret_data_is_masked_wherever_it_is(doc, where):
    masked, report = mask(doc)
    assert where(masked) == MASKED_DATA and report.fields["kubernetes-secrets"] == 2
    assert "aHVudGVyMg==" not in json.dumps(masked) and "plain" not in json.dumps(masked)


@pytest.mark.parametrize(
    "doc",
    [
        {"kind": "ConfigMap", "data": {"password": "visible"}},
        {"kind": "ConfigMapList", "items": [{"data": {"password": "visible"}}]},
        {"kind": "PodList", "items": [{"data": {"password": "visible"}}]},
        {"items": [{"data": {"password": "visible"}}]},
    ],
)
def test_other_kinds_are_left_alone(doc):
    masked, report = mask(doc)
    assert masked == doc and report.masked == 0


def test_the_last_applied_copy_of_a_secret_is_masked_too():
    table_row = {"kind": "PartialObjectMetadata", "metadata": {"name": "db", "annotations": {
        LAST_APPLIED: json.dumps(SECRET), "team": "shop"}}}
    masked, report = mask({"kind": "Table", "rows": [{"cells": [], "object": table_row}]})
    annotations = masked["rows"][0]["object"]["metadata"]["annotations"]
    assert json.loads(annotations[LAST_APPLIED])["data"] == MASKED_DATA and annotations["team"] == "shop"
    assert report.fields["kubernetes-secrets"] == 2


@pytest.mark.parametrize(
    "annotation, kept",
    [
        (json.dumps({"kind": "ConfigMap", "data": {"a": "b"}}), True),  # not a Secret: as it was
        ("{not json", False),  # unreadable: it might be one, masked whole
    ],
)
def test_last_applied_annotations_of_other_kinds(annotation, kept):
    masked, _ = mask({"kind": "ConfigMap", "metadata": {"annotations": {LAST_APPLIED: annotation}}})
    assert (masked["metadata"]["annotations"][LAST_APPLIED] == annotation) is kept


def test_container_environment_values():
    pod = {"kind": "Pod", "spec": {"containers": [{"env": [{"name": "DB_PASSWORD", "value": "x"},
                                                           {"name": "FROM", "valueFrom": {"secretKeyRef": {}}}]}]}}
    masked, _ = mask(pod, "kubernetes-env")
    assert masked["spec"]["containers"][0]["env"] == [{"name": "DB_PASSWORD", "value": "[REDACTED]"},
                                                      {"name": "FROM", "valueFrom": {"secretKeyRef": {}}}]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"objects": {"kind": "Secret"}}, "objects needs a kind and fields"),
        ({"objects": "Secret"}, "objects needs a kind and fields"),
        ({"objects": {"kind": "Secret", "fields": ["data"]}, "fields": ["$.x"]}, "exactly one of"),
    ],
)
def test_object_mask_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        parse(raw)


# SQL results (pg_bridge): a column is to SQL what a key is to JSON


def column(name, type_oid=25, fmt=0):
    return {"name": name, "table_oid": 0, "column": 0, "type_oid": type_oid, "type_size": -1, "type_modifier": -1,
            "format": fmt}


def sql_mask(columns, rows, *masks, error=None):
    from addons.engine.bridge import SQL_RESULTS

    results = [{"columns": columns, "rows": rows, "command": f"SELECT {len(rows)}"}]
    if error:
        results.append({"error": error})
    content = json.dumps({"results": results, "notices": [], "status": "I", "parameters": {}}).encode()
    out, report = Masker(parse_all(masks), _detector(), b"k").body(content, SQL_RESULTS)
    return json.loads(out), report


_DETECTOR = []


def _detector():
    if not _DETECTOR:
        from addons.engine.detectors import Detector

        _DETECTOR.append(Detector(None))
    return _DETECTOR[0]


def b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "columns, rows, masks, masked_rows, types",
    [
        # credential-named columns are masked whole; an int column that is masked becomes text
        ([column("id", 23), column("password"), column("api_token", 23)], [["1", "hunter2", "77"], ["2", None, "8"]],
         ("secret-keys",), [["1", "[REDACTED]", "[REDACTED]"], ["2", None, "[REDACTED]"]], [23, 25, 25]),
        # detection in free text, wherever it is in the cell
        ([column("note")], [["mail bob@example.com now"]], ("pii",), [["mail [EMAIL_ADDRESS] now"]], [25]),
        # a non-text type whose text was rewritten is announced as text, so clients read a string
        ([column("addr", 869)], [["10.1.2.3"]], ("pii",), [["[IP_ADDRESS]"]], [25]),
        # fields masks see each row as {column: value}
        ([column("id", 23), column("email")], [["1", "a@b.example"]], ({"fields": ["$.email"]},),
         [["1", "[REDACTED]"]], [23, 25]),
        # binary cells of text types are their UTF-8 bytes (base64 in transit)
        ([column("note", 25, 1)], [[b64("mail bob@example.com")]], ("pii",), [[b64("mail [EMAIL_ADDRESS]")]], [25]),
        # binary cells of other types cannot hold text: masked by name, the whole column goes
        ([column("secret_n", 23, 1)], [[b64("\x00\x00\x00\x07")]], ("secret-keys",), [[b64("[REDACTED]")]], [25]),
        # nothing to mask: rows and types unchanged
        ([column("n", 23)], [["1"]], ("pii",), [["1"]], [23]),
    ],
)
def test_sql_results_are_masked_by_column(columns, rows, masks, masked_rows, types):
    doc, _ = sql_mask(columns, rows, *masks)
    result = doc["results"][0]
    assert result["rows"] == masked_rows
    assert [c["type_oid"] for c in result["columns"]] == types


def test_sql_errors_are_masked_too():
    error = {"S": "ERROR", "C": "23505", "M": "duplicate key value violates unique constraint \"users_email_key\"",
             "D": "Key (email)=(bob@example.com) already exists."}
    doc, report = sql_mask([column("n", 23)], [], "pii", error=error)
    assert doc["results"][1]["error"]["D"] == "Key (email)=([EMAIL_ADDRESS]) already exists."
    assert doc["results"][1]["error"]["C"] == "23505" and report.entities["EMAIL_ADDRESS"] == 1


def test_a_described_column_is_retyped_like_an_executed_one():
    """Describe (no rows) and Execute must announce the same types for a masked column."""
    doc, _ = sql_mask([column("password", 23)], [], "secret-keys")
    assert doc["results"][0]["columns"][0]["type_oid"] == 25


# charsets, duplicates, headers and streams: the pure parts, with the real detector


@pytest.fixture(scope="module")
def detector():
    from addons.engine.detectors import Detector

    return Detector()


@pytest.mark.parametrize(
    "content, content_type, codec, bom",
    [
        (b"x", "text/plain", "utf-8", b""),
        (b"\xef\xbb\xbfx", "text/plain; charset=latin-1", "utf-8", b"\xef\xbb\xbf"),  # the mark wins
        (b"\xff\xfex\x00", "application/json", "utf-16-le", b"\xff\xfe"),
        (b"\xfe\xff\x00x", "text/plain; charset=utf-16", "utf-16-be", b"\xfe\xff"),
        (b"\xff\xfe\x00\x00x\x00\x00\x00", "", "utf-32-le", b"\xff\xfe\x00\x00"),
        (b"x\x00", "text/plain; charset=UTF-16LE", "utf-16-le", b""),
        (b"x", 'text/plain; charset="ISO-8859-1"', "iso8859-1", b""),
        (b"x", "text/plain; format=flowed; charset=cp1252", "cp1252", b""),
    ],
)
def test_text_codec(content, content_type, codec, bom):
    from addons.engine.masks import text_codec

    assert text_codec(content, content_type) == (codec, bom)


@pytest.mark.parametrize("content_type", ["text/plain; charset=utf-16", "text/plain; charset=utf-32",
                                          "text/plain; charset=x-unknown", "text/plain; charset=ucs-2"])
def test_text_codec_refuses_what_it_cannot_read(content_type):
    from addons.engine.masks import MaskError, text_codec

    with pytest.raises(MaskError):
        text_codec("x".encode("utf-16-le"), content_type)


def test_duplicate_keys_are_reported_and_the_body_reserialised(detector):
    masker = Masker(parse_all(["secrets"]), detector, b"k")
    out, report = masker.body(b'{"a": 1, "a": 2}', "application/json")
    assert out == b'{"a":2}' and report.masked == 0
    assert masker.body(b'{"a": 1, "b": 2}', "application/json")[0] == b'{"a": 1, "b": 2}'  # as it came


@pytest.mark.parametrize(
    "fields, masked",
    [
        ([("Set-Cookie", "sid=abc")], [("Set-Cookie", "[REDACTED]")]),
        ([("X-Token", "ghp_R8vQ2mZ7xK1pL9sT4wY6nB3cF5hJ0dA2eG7u")], [("X-Token", "[GITHUB_TOKEN]")]),
        ([("Content-Length", "4539148803436467")], [("Content-Length", "4539148803436467")]),  # framing stays
        ([("Content-Type", "text/plain; name=a@b.example")], [("Content-Type", "text/plain; name=a@b.example")]),
        ([("X-Owner", "dana.okafor@northwind-mail.com")], [("X-Owner", "[EMAIL_ADDRESS]")]),
        ([("Date", "Tue, 01 Dec 2026 23:18:09 GMT")], [("Date", "Tue, 01 Dec 2026 23:18:09 GMT")]),
    ],
)
def test_headers_are_masked_as_names_and_values(detector, fields, masked):
    assert Masker(parse_all(["secrets", "pii"]), detector, b"k").headers(fields, Report()) == masked


def test_a_keys_mask_masks_headers_by_name_on_every_flow(detector):
    masker = Masker(parse_all(["secret-keys"]), detector, b"k")  # one masker serves every flow with these masks
    flows = [[("X-Session-Token", "v"), ("X-Id", "v")], [("x-id", "w"), ("x-session-token", "w")]]
    assert [masker.headers(fields, Report()) for fields in flows] == [
        [("X-Session-Token", "[REDACTED]"), ("X-Id", "v")], [("x-id", "w"), ("x-session-token", "[REDACTED]")]]


@pytest.mark.parametrize(
    "chunks, out",
    [
        ([b"data: a\n", b"\n"], b"data: a\n\n"),
        ([b": ping\n\n"], b":\n\n"),
        ([b"retry: 10\nretry: x\n\n"], b"retry: 10\n\n"),
        ([b"foo: bar\nbaz\ndata: a\n\n"], b"data: a\n\n"),
        ([b"event: e\r\nid: 1\r\ndata:a\r\n\r\n"], b"event: e\nid: 1\ndata: a\n\r\n"),
        ([b"data: {\"a\":\ndata: 1}\n\n"], b"data: {\"a\":\ndata: 1}\n\n"),
        ([b"data: x\n\ndata: last"], b"data: x\n\ndata: last"),
    ],
)
def test_event_streams_keep_what_clients_read(detector, chunks, out):
    from addons.engine.streams import RecordStream

    stream = RecordStream(Masker(parse_all(["secrets"]), detector, b"k"), 4096, 4096, events=True)
    assert b"".join(stream(c) for c in [*chunks, b""]) == out


# SQL text, as it goes on record


@pytest.mark.parametrize(
    "sql, masks, recorded",
    [
        ("UPDATE users SET password = 'hunter2' WHERE id = 1", ("secret-keys",),
         "UPDATE users SET password = '[REDACTED]' WHERE id = 1"),
        ("INSERT INTO users (name, password) VALUES ('bob', 'hunter2'), ('al', E'x\\ty')", ("secret-keys",),
         "INSERT INTO users (name, password) VALUES ('bob', '[REDACTED]'), ('al', '[REDACTED]')"),
        ("SELECT 1 FROM users WHERE password::text = 'hunter2'::text", ("secret-keys",),
         "SELECT 1 FROM users WHERE password::text = '[REDACTED]'::text"),
        ("SELECT 1 FROM users u WHERE 'hunter2' = u.password", ("secret-keys",),
         "SELECT 1 FROM users u WHERE '[REDACTED]' = u.password"),
        ("SELECT 1 FROM users WHERE password IN ('a1', 'b2')", ("secret-keys",),
         "SELECT 1 FROM users WHERE password IN ('[REDACTED]', '[REDACTED]')"),
        ("SET app.api_token = 'tok-1234567'", ("secret-keys",), "SET app.api_token = '[REDACTED]'"),
        ("SELECT 'x' AS password", ("secret-keys",), "SELECT '[REDACTED]' AS password"),
        ("UPDATE users SET email = 'bob@example.com'", ({"fields": ["$.email"]},),
         "UPDATE users SET email = '[REDACTED]'"),
        ("SELECT E'key\\tAKIAIOSFODNN7EXAMPLE'", ("secrets",), "SELECT 'key\t[AWS_ACCESS_KEY_ID]'"),
        ("SELECT $$AKIAIOSFODNN7EXAMPLE$$", ("secrets",), "SELECT $$[AWS_ACCESS_KEY_ID]$$"),
        ("SELECT 1 -- AKIAIOSFODNN7EXAMPLE", ("secrets",), "SELECT 1 -- [AWS_ACCESS_KEY_ID]"),
        ("SELECT 'it''s bob@example.com'", ("pii",), "SELECT 'it''s [EMAIL_ADDRESS]'"),
        ("SELECT name FROM users WHERE id = 1", ("secret-keys", "pii", "secrets"), "SELECT name FROM users WHERE id = 1"),
        ("SELEC 'AKIAIOSFODNN7EXAMPLE", ("secrets",), "SELEC '[AWS_ACCESS_KEY_ID]"),  # does not scan: text
    ],
)
def test_statements_are_masked_as_sql_text(sql, masks, recorded):
    assert Masker(parse_all(masks), _detector(), b"k").statement(sql, Report()) == recorded


def test_a_request_masks_the_parameters_bound_to_masked_columns():
    from addons.engine.bridge import SQL_REQUEST

    body = {"sql": "UPDATE users SET password = $2, name = $1 WHERE id = $3", "params": ["bob", "hunter2", "7"],
            "extended": True}
    out, report = Masker(parse_all(("secret-keys",)), _detector(), b"k").body(json.dumps(body).encode(), SQL_REQUEST)
    assert json.loads(out)["params"] == ["bob", "[REDACTED]", "7"] and report.fields["secret-keys"] == 1


def test_recorded_operation_details_mask_every_statement_in_them():
    from addons.engine.masks import OPERATION

    doc = {"details": {"sql": "PREPARE p AS SELECT 'AKIAIOSFODNN7EXAMPLE'", "command": "PREPARE",
                       "prepares": {"sql": "PREPARE p AS SELECT 'AKIAIOSFODNN7EXAMPLE'"},
                       "prepared_sql": "UPDATE t SET password = 'x'"}, "parts": []}
    out, _ = Masker(parse_all(("secrets", "secret-keys")), _detector(), b"k").body(json.dumps(doc).encode(), OPERATION)
    details = json.loads(out)["details"]
    assert "AKIA" not in json.dumps(details) and details["prepared_sql"] == "UPDATE t SET password = '[REDACTED]'"


# SQL result columns: what happens to each is planned from its description alone


@pytest.mark.parametrize(
    "col, masks, plan",
    [
        # (column description, masks, (masked whole, retyped to text, detection, strict))
        (dict(name="password", type_oid=25), ("secret-keys",), (True, False, False, False)),
        (dict(name="p", type_oid=23, table_oid=7, column=4, origin="api_token"), ("secret-keys",),
         (True, True, False, False)),  # an int4 cannot hold [REDACTED]: text, in the description too
        (dict(name="lower", type_oid=25, sources=["password", "name"]), ("secret-keys",), (True, False, False, False)),
        (dict(name="u", type_oid=16390, sources=["id", "password"]), ("secret-keys",), (True, True, False, False)),
        (dict(name="x", type_oid=25, opaque=True), ("secret-keys",), (True, False, False, False)),
        (dict(name="x", type_oid=25, opaque=True), ("pii",), (False, False, True, False)),  # no column masks
        (dict(name="email", type_oid=25), ({"fields": ["$.email"]},), (True, False, False, False)),
        (dict(name="note", type_oid=25), ("pii",), (False, False, True, False)),
        (dict(name="tags", type_oid=1009), ("pii",), (False, False, True, False)),  # still an array
        (dict(name="addr", type_oid=869), ("pii",), (False, True, True, False)),  # inet: its text, as text
        (dict(name="r", type_oid=2249), ("secret-keys",), (False, True, False, False)),  # an anonymous record
        (dict(name="n", type_oid=20), ("pii",), (False, False, True, True)),  # a number: masked means refused
        (dict(name="t", type_oid=1184), ("pii",), (False, False, False, False)),  # no entity fits a timestamp
        (dict(name="u", type_oid=2950), ("pii", "secret-keys"), (False, False, False, False)),
    ],
)
def test_each_sql_column_is_planned_from_its_description(col, masks, plan):
    from addons.engine import sqlresults

    column = {"table_oid": 0, "column": 0, "format": 0, **col}
    p = sqlresults.plan(Masker(parse_all(masks), _detector(), b"k"), column)
    assert (p.whole is not None, p.retype, p.detect, p.strict) == plan


def test_a_number_detection_would_mask_refuses_the_result():
    from addons.engine.masks import MaskError

    with pytest.raises(MaskError, match="cannot be sent as that type"):
        sql_mask([column("card", 20)], [["4111111111111111"]], "pii")


def test_rows_as_json_objects_have_masked_keys_hidden_wherever_they_are():
    keyed = {**column("json_agg", 114), "keyed": True}
    doc, report = sql_mask([keyed], [[json.dumps([{"id": 1, "password": "pw", "nested": {"api_token": "t"}}])]],
                           "secret-keys")
    assert json.loads(doc["results"][0]["rows"][0][0]) == [{"id": 1, "password": "[REDACTED]",
                                                           "nested": {"api_token": "[REDACTED]"}}]


ESCAPED = [
    ('{"kind":"\\u0053ecret","data":{"password":"aHVudGVyMg=="}}', {"kind": "Secret", "data": MASKED_DATA}),
    ('{"kind":"ConfigMap","metadata":{"annotations":{"kubectl.kubernetes.io\\/last-applied-configuration":"{no"}}}',
     {"kind": "ConfigMap", "metadata": {"annotations": {LAST_APPLIED: "[REDACTED]"}}}),
    ('{"items":[{"kind":"Secret","data":{"password":"aHVudGVyMg=="}},{"kind":"Pod"}]}',
     {"items": [{"kind": "Secret", "data": MASKED_DATA}, {"kind": "Pod"}]}),
    ('{"kind":"PodList","items":[{"kind":"Pod","data":{"password":"visible"}}]}', None),
]


@pytest.mark.parametrize("body, masked", ESCAPED)
def test_a_body_is_walked_for_secrets_wherever_its_text_could_spell_one(body, masked):
    """A body is not walked for Secrets when neither the kind nor the annotation is in its
    text: every spelling JSON allows (\\u escapes, \\/) is still found."""
    out, _ = Masker(parse_all(("kubernetes-secrets",)), None, b"k").body(body.encode(), "application/json")
    assert (json.loads(out) if masked is not None else out) == (masked if masked is not None else body.encode())
