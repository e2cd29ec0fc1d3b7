"""Response masking end to end: field rules, content detection, operators, streams, size
and type limits, failing closed, and an audit store that never holds a planted secret."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import API_TOKEN, STANDARD_RULES, standard_gateway
from tests.support.gateway import Gateway
from tests.support.servers import Route

AWS_KEY = "AKIAQ3EXAMPLEZ7TW2PL"
GITHUB = "ghp_R8vQ2mZ7xK1pL9sT4wY6nB3cF5hJ0dA2eG7u"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjcmV3LTEiLCJleHAiOjE3OTU5MjY0MDB9.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMTIz"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Zx9exampleKEYmaterialQ2\n-----END RSA PRIVATE KEY-----"
DSN_PASSWORD = "Tr0ub4dor-and-3"
CARD = "4539 1488 0343 6467"
EMAIL = "dana.okafor@northwind-mail.com"
API_TOKEN_VALUE = "tok-93f1c2aa7b"
PASSWORD_VALUE = "correct-horse-battery"
PLANTED = [AWS_KEY, GITHUB, JWT, "MIIEowIBAAKCAQEA0Zx9exampleKEYmaterialQ2", DSN_PASSWORD, CARD, EMAIL,
           API_TOKEN_VALUE, PASSWORD_VALUE]

MASK_RULES = {
    "access.yaml": STANDARD_RULES["access.yaml"],
    "masks.yaml": {"rules": [
        {"id": "users-masked", "match": {"connection": "api", "path": "/users/**", "action": "read"}, "effect": "allow",
         "masks": [{"fields": ["$.users[*].email"]}, "secret-keys"]},
        {"id": "config-masked", "match": {"connection": "api", "path": ["/config/**", "/logs/**", "/files/**", "/big/**", "/stream/**", "/slow/**"]},
         "effect": "allow",
         "masks": ["secrets", {"detect": ["CREDIT_CARD"], "operator": "partial"}, {"detect": ["EMAIL_ADDRESS"], "operator": "hash"}]},
        {"id": "text-with-fields", "match": {"connection": "api", "path": "/csv/**"}, "effect": "allow",
         "masks": [{"fields": "$..password"}]},
        {"id": "writes-masked-in-the-record", "match": {"connection": "api", "method": "POST", "path": "/credentials"},
         "effect": "allow", "masks": ["secrets", "secret-keys"]},
    ]},
}


def make(directory: Path, servers, **overrides) -> Gateway:
    gw = standard_gateway(directory, servers, rules=MASK_RULES, **overrides)
    # a generous timeout: masking 30,000 rows on a loaded machine is slow, not broken (the
    # broken-detector gateway below proves what a timeout does)
    gw.config["masking"] = {"workers": 1, "timeout": "60s", "max_body": 4 * 1024 * 1024, "max_record": 4096}
    gw.config_file.write_text(__import__("yaml").safe_dump(gw.config))
    return gw


def wait_ready(gw: Gateway, token: str) -> None:
    """Masking workers start in the background; wait until a masked request succeeds."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = gw.session(token).get("http://api.test/config/ping")
        if r.status_code == 200:
            return
        time.sleep(0.3)
    raise AssertionError(f"masking never became ready: {r.status_code} {r.text}")


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, upstream):
    upstream.routes["/config/ping"] = Route("application/json", b'{"ok": true}')
    gateway = make(tmp_path_factory.mktemp("masking"), servers).start()
    yield gateway
    gateway.stop()


@pytest.fixture
def analyst(token):
    return token(groups=["analysts", "writers"])


@pytest.fixture(autouse=True)
def ready(gw, analyst):
    wait_ready(gw, analyst)


def serve(upstream, path: str, document, content_type: str = "application/json") -> None:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    upstream.routes[path] = Route(content_type, body)


# field rules


def test_field_masks_and_builtin_secret_keys(gw, upstream, analyst):
    serve(upstream, "/users/all", {"users": [
        {"id": 1, "email": EMAIL, "name": "Dana", "api_token": API_TOKEN_VALUE, "active": True, "score": 9.5,
         "profile": {"Password": PASSWORD_VALUE, "theme": "dark"}},
        {"id": 2, "email": "other@example.org", "name": "Lee", "api_token": None, "active": False, "score": 1},
    ]})
    r = gw.session(analyst).get("https://api.test/users/all")
    assert r.status_code == 200
    users = r.json()["users"]  # still valid JSON
    assert [u["email"] for u in users] == ["[REDACTED]", "[REDACTED]"]
    assert users[0]["api_token"] == "[REDACTED]" and users[0]["profile"]["Password"] == "[REDACTED]"
    assert users[1]["api_token"] == "[REDACTED]"  # whatever the value, even null
    assert (users[0]["id"], users[0]["name"], users[0]["active"], users[0]["score"]) == (1, "Dana", True, 9.5)
    assert users[0]["profile"]["theme"] == "dark"
    event = gw.events("kind = 'response' AND resource = '/users/all'")[-1]
    assert json.loads(event["detail"])["masking"] == {
        "masked": 5, "fields": {"fields:$.users[*].email": 2, "secret-keys": 3}, "entities": {}}


# detection and operators


def test_detection_with_redact_partial_and_hash(gw, upstream, analyst):
    document = {
        "service": "billing", "port": 5432, "enabled": True,
        "aws": {"key_id": AWS_KEY}, "ci": f"uses {GITHUB} to push", "session": JWT, "tls": PEM,
        "database": f"postgres://billing:{DSN_PASSWORD}@db.internal:5432/billing",
        "card_on_file": CARD, "owner": EMAIL, "backup_owner": EMAIL,
        "note": "order 4711 shipped 2026-11-29T06:30:00Z to cust-00042",
    }
    serve(upstream, "/config/billing", document)
    r = gw.session(analyst).get("http://api.test/config/billing")
    assert r.status_code == 200
    masked = r.json()
    assert masked["aws"]["key_id"] == "[AWS_ACCESS_KEY_ID]"
    assert masked["ci"] == "uses [GITHUB_TOKEN] to push"
    assert masked["session"] == "[JWT]" and masked["tls"] == "[PRIVATE_KEY]"
    assert masked["database"] == "postgres://billing:[URL_CREDENTIAL]@db.internal:5432/billing"
    assert masked["card_on_file"] == "****6467"
    assert masked["owner"].startswith("[EMAIL_ADDRESS:") and masked["owner"] == masked["backup_owner"]
    assert (masked["service"], masked["port"], masked["enabled"], masked["note"]) == (
        "billing", 5432, True, document["note"])  # no false positives on ids, timestamps, numbers
    again = gw.session(analyst).get("http://api.test/config/billing").json()
    assert again["owner"] == masked["owner"]  # keyed hash: equal values stay matchable


def test_plain_text_is_scanned_as_text(gw, upstream, analyst):
    serve(upstream, "/logs/app", f"start\nconnecting with {GITHUB}\npayment by {EMAIL}\n".encode(), "text/plain")
    r = gw.session(analyst).get("http://api.test/logs/app")
    assert r.status_code == 200
    assert r.text.startswith("start\nconnecting with [GITHUB_TOKEN]\npayment by [EMAIL_ADDRESS:")


@pytest.mark.parametrize(
    "path, content_type, body, reason",
    [
        ("/csv/export", "text/csv", b"user,password\nbob,hunter2\n",
         "field masks need a JSON body, and this text/csv is not JSON; it was not sent"),
        ("/config/broken", "application/json", b'{"key": "AKIA',
         "the response says it is application/json but does not parse as JSON; it was not sent"),
        ("/files/logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
         "a image/png response cannot be masked; it was not sent"),
        ("/config/latin1", "text/plain", "caf\xe9 AKIA".encode("latin-1"),
         "the response body (text/plain) is not text and cannot be masked; it was not sent"),
    ],
)
def test_bodies_that_cannot_be_masked_are_refused(gw, upstream, analyst, path, content_type, body, reason):
    serve(upstream, path, body, content_type)
    r = gw.session(analyst).get(f"http://api.test{path}")
    assert r.status_code == 502
    assert r.json()["error"] == "masking_refused" and r.json()["reason"] == reason
    assert body not in r.content


def test_a_body_larger_than_masking_allows_is_refused_at_its_headers(gw, upstream, analyst):
    big = json.dumps({"blob": "x" * (5 * 1024 * 1024)}).encode()
    serve(upstream, "/big/announced", big)
    r = gw.session(analyst).get("http://api.test/big/announced")
    assert r.status_code == 502 and r.json()["error"] == "masking_refused"
    assert "larger than masking allows" in r.json()["reason"] and len(r.content) < 1000


# streams


def test_server_sent_events_are_masked_record_by_record_as_they_arrive(gw, upstream, analyst):
    release = threading.Event()
    upstream.routes["/stream/events"] = Route("text/event-stream", chunks=[
        b"event: job\ndata: {\"step\": 1, \"token\": \"" + GITHUB.encode()[:20],
        GITHUB.encode()[20:] + b"\"}\n\n",  # a record split across chunks
        b"data: deploy key " + AWS_KEY.encode() + b" used\n\n",
    ], gates={2: release})
    with gw.session(analyst).get("http://api.test/stream/events", stream=True, timeout=20) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == b"event: job"
        assert next(lines) == b'data: {"step":1,"token":"[GITHUB_TOKEN]"}'
        release.set()  # the next event is only sent once the first was received: it streamed
        rest = [line for line in lines if line]
    assert rest == [b"data: deploy key [AWS_ACCESS_KEY_ID] used"]
    event = gw.wait_events("kind = 'response' AND resource = '/stream/events'")[-1]
    detail = json.loads(event["detail"])
    assert detail["masking"]["entities"] == {"GITHUB_TOKEN": 1, "AWS_ACCESS_KEY_ID": 1}
    assert GITHUB.encode() not in event["body"] and b"[GITHUB_TOKEN]" in event["body"]


def test_kubernetes_style_watch_streams_json_lines(gw, upstream, analyst):
    upstream.routes["/stream/pods"] = Route("application/json", chunks=[
        json.dumps({"type": "ADDED", "object": {"env": [{"name": "DB", "value": f"postgres://u:{DSN_PASSWORD}@db/x"}]}}).encode() + b"\n",
        json.dumps({"type": "MODIFIED", "object": {"owner": EMAIL}}).encode() + b"\n",
    ])
    r = gw.session(analyst).get("http://api.test/stream/pods?watch=true", timeout=20)
    events = [json.loads(line) for line in r.content.splitlines()]
    assert events[0]["object"]["env"][0]["value"] == "postgres://u:[URL_CREDENTIAL]@db/x"
    assert events[1]["object"]["owner"].startswith("[EMAIL_ADDRESS:")


def test_a_stream_record_that_cannot_be_masked_cuts_the_stream(gw, upstream, analyst):
    upstream.routes["/stream/huge"] = Route("application/x-ndjson", chunks=[
        b'{"n": 1, "note": "fine"}\n',
        b'{"n": 2, "blob": "' + b"y" * 8000 + AWS_KEY.encode() + b'"}\n',
        b'{"n": 3, "key": "' + AWS_KEY.encode() + b'"}\n',
    ])
    r = gw.session(analyst).get("http://api.test/stream/huge", timeout=20)
    records = [json.loads(line) for line in r.content.splitlines()]
    assert records == [{"n": 1, "note": "fine"},
                       {"error": "masking_refused", "reason": "a streamed record is longer than 4096 bytes"}]
    assert AWS_KEY.encode() not in r.content
    event = gw.wait_events("kind = 'response' AND resource = '/stream/huge'")[-1]
    assert json.loads(event["detail"])["masking"]["error"] == "a streamed record is longer than 4096 bytes"


# audit


def test_secrets_never_reach_the_audit_store(gw, upstream, analyst):
    serve(upstream, "/config/everything", {"aws": AWS_KEY, "gh": GITHUB, "jwt": JWT, "pem": PEM,
                                          "dsn": f"mysql://root:{DSN_PASSWORD}@db/app", "card": CARD, "mail": EMAIL})
    assert gw.session(analyst).get("http://api.test/config/everything").status_code == 200
    r = gw.session(analyst).post("http://api.test/credentials", json={
        "api_token": API_TOKEN_VALUE, "password": PASSWORD_VALUE, "note": f"rotate {GITHUB}"})
    assert r.status_code == 200  # the upstream got the real request...
    assert PASSWORD_VALUE in upstream.received[-1].body.decode()
    recorded = gw.events("kind = 'request' AND resource = '/credentials'")[-1]
    assert b"[REDACTED]" in recorded["body"]  # ...the record has it masked
    store = gw.store()
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    raw = b"".join(p.read_bytes() for p in gw.dir.glob("audit.db*"))
    found = [s for s in PLANTED if s.encode() in raw or json.dumps(s)[1:-1].encode() in raw]
    assert found == []


# not stalling other flows


def test_a_large_masked_body_does_not_hold_up_small_requests(gw, upstream, analyst):
    rows = [{"id": i, "mail": f"user{i}@example.com", "note": f"key {AWS_KEY}" if i % 97 == 0 else "ok"} for i in range(30000)]
    serve(upstream, "/config/large", {"rows": rows})
    session = gw.session(analyst)
    with ThreadPoolExecutor(max_workers=4) as pool:
        large = pool.submit(session.get, "http://api.test/config/large", timeout=60)
        time.sleep(0.2)
        small_done = []
        for n in range(20):
            assert session.get(f"http://api.test/items/{n}", timeout=30).status_code == 200
            small_done.append(large.done())
        result = large.result()
    assert result.status_code == 200 and AWS_KEY not in result.text
    assert not all(small_done), "the small requests only finished after the large one"
    assert small_done[0] is False


# failing closed


@pytest.fixture(scope="module")
def broken(tmp_path_factory, servers, upstream):
    broken_dir = str(Path(__file__).parent / "support" / "broken")  # its sitecustomize first, then this tree
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [broken_dir, os.environ.get("PYTHONPATH", "")])),
           "CUSTODY_TEST_BREAK_DETECTOR": "1",
           "TEST_API_TOKEN": API_TOKEN}
    gateway = make(tmp_path_factory.mktemp("broken"), servers, env=env)
    gateway.config["masking"]["timeout"] = "2s"
    gateway.config_file.write_text(__import__("yaml").safe_dump(gateway.config))
    yield gateway.start()
    gateway.stop()


@pytest.mark.parametrize(
    "marker, reason",
    [
        ("BREAK-THE-DETECTOR", "masking failed: RuntimeError: the detector was broken on purpose; the response was not sent"),
        ("HANG-THE-DETECTOR", "masking did not finish within 2s; the response was not sent"),
    ],
)
def test_a_broken_detector_refuses_the_response(broken, upstream, analyst, marker, reason):
    wait_ready(broken, analyst)
    serve(upstream, f"/config/{marker.lower()}", {"value": f"{marker} {AWS_KEY}"})
    r = broken.session(analyst).get(f"http://api.test/config/{marker.lower()}", timeout=30)
    assert r.status_code == 502
    assert r.json()["error"] == "masking_unavailable" and r.json()["reason"] == reason
    assert AWS_KEY not in r.text and marker not in r.text
    event = broken.events("kind = 'response' AND resource = ?", [f"/config/{marker.lower()}"])[-1]
    assert event["status"] == 502 and AWS_KEY.encode() not in event["body"]
    wait_ready(broken, analyst)  # and the workers come back


def test_a_killed_worker_refuses_the_response_and_is_replaced(broken, upstream, analyst):
    wait_ready(broken, analyst)
    serve(upstream, "/config/victim", {"value": f"HANG-THE-DETECTOR {AWS_KEY}"})
    session = broken.session(analyst)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(session.get, "http://api.test/config/victim", timeout=30)
        time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(broken.proc.pid), "-f", "multiprocessing.spawn"],
                                 capture_output=True, text=True).stdout.split()
        assert workers
        for pid in workers:
            os.kill(int(pid), signal.SIGKILL)
        r = pending.result()
    assert r.status_code == 502 and r.json()["error"] == "masking_unavailable"
    assert AWS_KEY not in r.text
    wait_ready(broken, analyst)


def test_a_broken_detector_cuts_a_stream(broken, upstream, analyst):
    upstream.routes["/stream/broken"] = Route("application/x-ndjson", chunks=[
        b'{"n": 1}\n', b'{"n": 2, "v": "BREAK-THE-DETECTOR ' + AWS_KEY.encode() + b'"}\n', b'{"n": 3}\n'])
    r = broken.session(analyst).get("http://api.test/stream/broken", timeout=20)
    lines = r.content.splitlines()
    assert lines[0] == b'{"n": 1}' and len(lines) == 2
    assert json.loads(lines[1]) == {"error": "masking_refused",
                                    "reason": "masking failed: RuntimeError: the detector was broken on purpose"}
    assert AWS_KEY.encode() not in r.content and b'"n": 3' not in r.content


# headers


CARD_DIGITS = CARD.replace(" ", "")
HEADER_SECRETS = [
    # (header, value, what the agent sees in its place)
    ("X-Debug-Token", GITHUB, "[GITHUB_TOKEN]"),
    ("X-Deploy", f"key {AWS_KEY} in use", "key [AWS_ACCESS_KEY_ID] in use"),
    ("X-Session", JWT, "[JWT]"),
    ("Set-Cookie", "session=s3ss10n-v4lue-93ab; HttpOnly", "[REDACTED]"),
    ("Authorization", "Bearer upstream-echoed-credential", "[REDACTED]"),
    ("X-Api-Key", "k-1234567890abcdef", "[REDACTED]"),
    ("X-Auth-Token", "t-1234567890abcdef", "[REDACTED]"),
    ("Location", f"https://admin:{DSN_PASSWORD}@db.internal/", "[URL_CREDENTIAL]"),
    ("X-Owner", EMAIL, "[EMAIL_ADDRESS:"),
    ("Link", f"<mailto:{EMAIL}>; rel=author", "[EMAIL_ADDRESS:"),
    ("Content-Disposition", f'attachment; filename="{EMAIL} report.csv"', "[EMAIL_ADDRESS:"),
    ("Warning", f'199 - "card {CARD} declined"', "****6467"),
    ("X-Card", CARD_DIGITS, "****6467"),
    ("Refresh", f"0; url=https://x.test/?token={GITHUB}", "[GITHUB_TOKEN]"),
]


@pytest.mark.parametrize("name, value, shown", HEADER_SECRETS)
def test_response_headers_are_masked_for_the_agent_and_the_record(gw, upstream, analyst, name, value, shown):
    path = f"/config/headers/{name.lower()}"
    upstream.routes[path] = Route("application/json", b'{"ok": true}', headers=((name, value),))
    r = gw.session(analyst).get(f"http://api.test{path}")
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert shown in r.headers[name] and value not in r.headers[name]
    event = gw.wait_events("kind = 'response' AND resource = ?", [path])[-1]
    assert value not in event["detail"] and json.dumps(value)[1:-1] not in event["detail"]


def test_a_secret_in_a_header_never_reaches_the_record_even_unmasked(gw, upstream, analyst):
    """No rule masks /items: the agent gets the header as sent, the audit store does not."""
    upstream.routes["/items/debug"] = Route("application/json", b"{}", headers=(("X-Debug-Token", GITHUB),))
    r = gw.session(analyst).get("http://api.test/items/debug", headers={"X-Trace": f"sent with {AWS_KEY}"})
    assert r.headers["X-Debug-Token"] == GITHUB
    request, response = [gw.wait_events("kind = ? AND resource = '/items/debug'", [k])[-1] for k in ("request", "response")]
    assert GITHUB not in response["detail"] and "[GITHUB_TOKEN]" in response["detail"]
    assert AWS_KEY not in request["detail"] and "[AWS_ACCESS_KEY_ID]" in request["detail"]


# JSON that can be read two ways


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys reached the agent: {keys}"
    return dict(pairs)


DUPLICATES = [
    b'{"note": "fine", "note": "' + AWS_KEY.encode() + b'"}',
    b'{"note": "' + AWS_KEY.encode() + b'", "note": "fine"}',
    b'{"note": "fine", "note": "fine"}',
    b'{"a": {"k": 1, "k": "' + GITHUB.encode() + b'"}}',
    b'[{"id": 1}, {"id": 2, "id": "' + EMAIL.encode() + b'"}]',
    b'{"k": 1, "k": 2, "k": "' + JWT.encode() + b'"}',
    b'{"note": "fine", "\\u006eote": "' + AWS_KEY.encode() + b'"}',
    b'{"n\\u006fte": "' + AWS_KEY.encode() + b'", "note": "fine"}',
    b'{"deep": [[{"x": {"y": 1, "y": "' + GITHUB.encode() + b'"}}]]}',
    b'{"v": "' + AWS_KEY.encode() + b'", "v": null}',
    b'{"v": ["' + AWS_KEY.encode() + b'"], "v": 3}',
    b'{"role": "reader", "role": "admin"}',
]


@pytest.mark.parametrize("body", DUPLICATES)
def test_json_with_duplicate_keys_is_reserialised_never_forwarded_as_it_came(gw, upstream, analyst, body):
    serve(upstream, "/config/duplicates", body)
    r = gw.session(analyst).get("http://api.test/config/duplicates")
    assert r.status_code == 200 and r.content != body
    json.loads(r.content, object_pairs_hook=no_duplicates)
    assert not any(s.encode() in r.content for s in (AWS_KEY, GITHUB, EMAIL, JWT))


@pytest.mark.parametrize("body", DUPLICATES[:4])
def test_json_lines_with_duplicate_keys_are_reserialised(gw, upstream, analyst, body):
    upstream.routes["/stream/duplicates"] = Route("application/x-ndjson", chunks=[body + b"\n"])
    r = gw.session(analyst).get("http://api.test/stream/duplicates", timeout=20)
    json.loads(r.content, object_pairs_hook=no_duplicates)
    assert AWS_KEY.encode() not in r.content and GITHUB.encode() not in r.content


# keys and numbers


KEYS_AND_NUMBERS = [
    ({EMAIL: {"role": "admin"}}, EMAIL),
    ({"owners": {EMAIL: True}}, EMAIL),
    ({AWS_KEY: "in use"}, AWS_KEY),
    ({f"token {GITHUB}": 1}, GITHUB),
    ([{EMAIL: 1}, {EMAIL: 2}], EMAIL),
    ({"card": int(CARD_DIGITS)}, CARD_DIGITS),
    ({"payment": {"number": int(CARD_DIGITS)}}, CARD_DIGITS),
    ({"cards": [int(CARD_DIGITS), 5500000000000004]}, CARD_DIGITS),
    ({"amex": 378282246310005}, "378282246310005"),
    ({"visa": 4111111111111111}, "4111111111111111"),
    ({"mc": 5555555555554444}, "5555555555554444"),
    ({"float": float(CARD_DIGITS)}, CARD_DIGITS),
    ({"both": {EMAIL: int(CARD_DIGITS)}}, CARD_DIGITS),
]


@pytest.mark.parametrize("document, secret", KEYS_AND_NUMBERS)
def test_detection_covers_keys_and_numbers(gw, upstream, analyst, document, secret):
    serve(upstream, "/config/shapes", document)
    r = gw.session(analyst).get("http://api.test/config/shapes")
    assert r.status_code == 200
    assert secret not in r.text and secret not in r.text.replace(" ", "")
    r.json()  # still JSON


def test_ordinary_numbers_and_keys_are_left_alone(gw, upstream, analyst):
    document = {"id": 12345, "total": 99999999999, "ratio": 0.25, "items": {"sku-1": 3}, "ok": True}
    serve(upstream, "/config/plain-numbers", document)
    assert gw.session(analyst).get("http://api.test/config/plain-numbers").json() == document


# charsets


def text_in(codec: str, bom: bytes = b"") -> bytes:
    return bom + f"caf\u00e9 owner {EMAIL} key {AWS_KEY}\n".encode(codec)


def json_in(codec: str, bom: bytes = b"") -> bytes:
    return bom + json.dumps({"owner": EMAIL, "key": AWS_KEY, "city": "Z\u00fcrich"}, ensure_ascii=False).encode(codec)


CHARSETS = [
    # (content type, body, codec the agent reads it in; None = refused)
    ("text/plain; charset=utf-16", text_in("utf-16"), "utf-16"),
    ("text/plain; charset=UTF-16", b"\xfe\xff" + text_in("utf-16-be"), "utf-16"),
    ("text/plain; charset=utf-16le", text_in("utf-16-le"), "utf-16-le"),
    ("text/plain; charset=utf-16be", text_in("utf-16-be"), "utf-16-be"),
    ("text/plain; charset=utf-32", text_in("utf-32"), "utf-32"),
    ("application/json; charset=utf-16", json_in("utf-16"), "utf-16"),
    ("application/json", json_in("utf-16"), "utf-16"),  # undeclared, but its byte-order mark says so
    ("application/json", b"\xef\xbb\xbf" + json_in("utf-8"), "utf-8-sig"),
    ("text/plain; charset=iso-8859-1", text_in("latin-1"), "latin-1"),
    ('text/plain; charset="windows-1252"', text_in("cp1252"), "cp1252"),
    ("application/json; charset=latin1", json_in("latin-1"), "latin-1"),
    ("text/plain; charset=iso-8859-15", f"caf\u00e9 \u20ac owner {EMAIL} key {AWS_KEY}".encode("iso-8859-15"), "iso-8859-15"),
    ("text/plain; charset=utf-16", text_in("utf-16-le"), None),  # no byte-order mark: which order?
    ("text/plain; charset=x-klingon", text_in("utf-8"), None),
    ("text/plain", text_in("utf-16-le"), None),  # UTF-16 without saying so: NULs in "UTF-8"
    ("application/json", json_in("utf-16-be"), None),
]


@pytest.mark.parametrize("content_type, body, codec", CHARSETS)
def test_text_is_masked_in_the_charset_it_declares_or_refused(gw, upstream, analyst, content_type, body, codec):
    serve(upstream, "/config/charset", body, content_type)
    r = gw.session(analyst).get("http://api.test/config/charset")
    if codec is None:
        assert r.status_code == 502 and r.json()["error"] == "masking_refused"
        assert body not in r.content
        return
    assert r.status_code == 200
    text = r.content.decode(codec)
    assert EMAIL not in text and AWS_KEY not in text and "[AWS_ACCESS_KEY_ID]" in text
    assert ("caf\u00e9" in text) or ("Z\u00fcrich" in text)


# streams: every field, secrets over several lines, framing


PEM_LINES = PEM.split("\n")
SSE_EVENTS = [
    # (what the upstream streams, what must not reach the agent, what must: the stream arrived whole)
    (f"event: {GITHUB}\ndata: x\n\n", GITHUB, b"event: [GITHUB_TOKEN]\ndata: x\n\n"),
    (f"id: {AWS_KEY}\ndata: x\n\n", AWS_KEY, b"id: [AWS_ACCESS_KEY_ID]\ndata: x\n\n"),
    (f": debug {GITHUB}\ndata: x\n\n", GITHUB, b":\ndata: x\n\n"),
    (f":{JWT}\n\n", JWT, b":\n\n"),
    (f"retry: {AWS_KEY}\ndata: x\n\n", AWS_KEY, b"data: x\n\n"),
    (f"x-note: {GITHUB}\ndata: x\n\n", GITHUB, b"data: x\n\n"),
    (f"{GITHUB}\ndata: x\n\n", GITHUB, b"data: x\n\n"),
    ("".join(f"data: {line}\n" for line in PEM_LINES) + "\n", PEM_LINES[1], b"data: [PRIVATE_KEY]\n\n"),
    ("".join(f"data:{line}\n" for line in PEM_LINES) + "\n", PEM_LINES[1], b"data: [PRIVATE_KEY]\n\n"),
    ("".join(f"data: {line}\r\n" for line in PEM_LINES) + "\r\n", PEM_LINES[1], b"data: [PRIVATE_KEY]\n\r\n"),
    (f'data: {{"key":\ndata: "{AWS_KEY}"}}\n\n', AWS_KEY, b'data: {"key":"[AWS_ACCESS_KEY_ID]"}\n\n'),
    (f"data: {EMAIL}\r\n\r\n", EMAIL, b"data: [EMAIL_ADDRESS:"),
    (f"event: a\ndata: first\n\ndata: then {GITHUB}", GITHUB, b"data: then [GITHUB_TOKEN]"),  # no blank line at the end
    (f"data: ok\n\nid: 7\nevent: {EMAIL}\ndata: {AWS_KEY}\n\n", AWS_KEY, b"id: 7\nevent: [EMAIL_ADDRESS:"),
]


@pytest.mark.parametrize("stream, secret, shown", SSE_EVENTS)
def test_every_field_of_an_event_stream_is_masked_or_dropped(gw, upstream, analyst, stream, secret, shown):
    raw = stream.encode()
    upstream.routes["/stream/sse"] = Route("text/event-stream", chunks=[raw[:len(raw) // 2], raw[len(raw) // 2:]])
    r = gw.session(analyst).get("http://api.test/stream/sse", timeout=20)
    assert r.status_code == 200
    assert secret.encode() not in r.content and secret.encode() not in r.content.replace(b"\n", b"")
    assert shown in r.content


def test_event_stream_data_stays_data(gw, upstream, analyst):
    upstream.routes["/stream/sse-plain"] = Route("text/event-stream", chunks=[
        b"retry: 3000\n: keep-alive\nevent: job\nid: 41\ndata: line one\ndata: line two\n\n"])
    r = gw.session(analyst).get("http://api.test/stream/sse-plain", timeout=20)
    assert r.content == b"retry: 3000\n:\nevent: job\nid: 41\ndata: line one\ndata: line two\n\n"


TEXT_STREAMS = [
    PEM + "\n",
    "log start\n" + PEM + "\nlog end\n",
    PEM.replace("\n", "\r\n") + "\r\n",
    "2024-01-01 key follows\n" + PEM,  # the stream ends with the key's last line
]


@pytest.mark.parametrize("text", TEXT_STREAMS)
def test_a_private_key_over_several_lines_of_a_text_stream_is_masked(gw, upstream, analyst, text):
    raw = text.encode()
    upstream.routes["/stream/log"] = Route("text/plain", chunks=[raw[i:i + 17] for i in range(0, len(raw), 17)])
    r = gw.session(analyst).get("http://api.test/stream/log?follow=true", timeout=20)
    assert r.status_code == 200
    assert PEM_LINES[1].encode() not in r.content and b"[PRIVATE_KEY]" in r.content


def test_a_text_stream_that_ends_inside_a_private_key_is_cut_off(gw, upstream, analyst):
    upstream.routes["/stream/cut-key"] = Route("text/plain", chunks=[("\n".join(PEM_LINES[:2]) + "\n").encode()])
    r = gw.session(analyst).get("http://api.test/stream/cut-key?follow=true", timeout=20)
    assert PEM_LINES[1].encode() not in r.content
    assert b"[custody: the stream was cut off: the stream ended inside a private key" in r.content


def keep_alive_pair(gw, analyst: str, first: str, second: str) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """Two requests on one kept-alive HTTP/1.1 connection to the gateway (a real client:
    http.client), the responses read one after the other."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=20)
    out = []
    for url in (first, second):
        conn.request("GET", url, headers={"Proxy-Authorization": f"Bearer {analyst}"})
        response = conn.getresponse()
        out.append((response.status, response.read()))
    conn.close()
    return out[0], out[1]


@pytest.mark.parametrize("route", [
    Route("text/event-stream", f"data: {GITHUB}\n\ndata: tail\n\n".encode()),  # with a content-length
    Route("text/event-stream", chunks=[b"data: start\n\n", f"data: {GITHUB[:9]}".encode(), f"{GITHUB[9:]}\n\n".encode()]),
    Route("application/x-ndjson", f'{{"k": "{AWS_KEY}"}}\n{{"k": 2}}\n'.encode()),
    Route("application/x-ndjson", chunks=[b'{"k": ', f'"{AWS_KEY}"}}\n'.encode(), b'{"k": 2}\n']),
])
def test_a_masked_stream_keeps_http1_framing_on_a_kept_alive_connection(gw, upstream, analyst, route):
    upstream.routes["/stream/framed"] = route
    upstream.routes["/config/next"] = Route("application/json", b'{"next": "response"}')
    (status, body), (next_status, next_body) = keep_alive_pair(
        gw, analyst, "http://api.test/stream/framed", "http://api.test/config/next")
    assert status == 200 and GITHUB.encode() not in body and AWS_KEY.encode() not in body
    assert body.rstrip().endswith((b"data: tail", b'{"k": 2}', b'{"k":2}', b"[GITHUB_TOKEN]"))
    assert (next_status, json.loads(next_body)) == (200, {"next": "response"})
