"""HTTP classification, as a table: path normalisation, actions, overrides, bodies."""

from __future__ import annotations

import pytest

from addons.classifiers import http as httpops
from addons.engine.model import UNPARSEABLE


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("/", "/"),
        ("", "/"),
        ("/items", "/items"),
        ("/items/", "/items"),
        ("//items//1", "/items/1"),
        ("/a/./b", "/a/b"),
        ("/a/b/../c", "/a/c"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%252e%252e/b", "/b"),
        ("/a%2fb", "/a/b"),
        ("/%61dmin", "/admin"),
        ("/a\\..\\admin", "/admin"),
        ("/a/..;/admin", "/admin"),
        ("/admin;jsessionid=1/users", "/admin/users"),
        ("/files/report%20q1.pdf", "/files/report q1.pdf"),
        ("/Items", "/Items"),
    ],
)
def test_normalise_path(raw, normal):
    assert httpops.normalise_path(raw) == normal


@pytest.mark.parametrize(
    "method, headers, target, action, override",
    [
        ("GET", {}, "/x", "read", None),
        ("HEAD", {}, "/x", "read", None),
        ("OPTIONS", {}, "/x", "read", None),
        ("POST", {}, "/x", "write", None),
        ("PUT", {}, "/x", "write", None),
        ("PATCH", {}, "/x", "write", None),
        ("DELETE", {}, "/x", "delete", None),
        ("PROPFIND", {}, "/x", "unknown", None),
        ("get", {}, "/x", "read", None),
        ("GET", {"x-http-method-override": "DELETE"}, "/x", "delete", "DELETE"),
        ("POST", {"x-http-method-override": "GET"}, "/x", "write", "GET"),
        ("GET", {"x-http-method": "put"}, "/x", "write", "PUT"),
        ("GET", {"x-method-override": "PURGE"}, "/x", "unknown", "PURGE"),
        ("GET", {}, "/x?_method=DELETE", "delete", "DELETE"),
    ],
)
def test_action(method, headers, target, action, override):
    op = httpops.classify("api", method, target, headers, None)
    assert op.action == action
    assert op.details.get("method_override") == override
    assert op.risk == httpops.RISK[action]
    assert op.protocol == "http" and op.connection == "api"


def test_operation_fields():
    op = httpops.classify("api", "GET", "/items/../orders/?limit=5&x", {}, None)
    assert op.resource == "/orders"
    assert op.details == {"method": "GET", "path": "/orders", "query": "limit=5&x", "body": "none"}
    assert op.summary == "GET /orders on api"


@pytest.mark.parametrize(
    "content_type, content, payload, kind",
    [
        ("application/json", b'{"a": 1}', {"a": 1}, "json"),
        ("application/merge-patch+json", b'{"a": [1, 2]}', {"a": [1, 2]}, "json"),
        ("", b'  [1, 2]', [1, 2], "json"),
        ("text/plain", b'{"a": 1}', {"a": 1}, "json"),
        ("application/json", b'{"a": 1', UNPARSEABLE, "unparseable"),
        ("application/json", b'{"a": 1, "a": 2}', UNPARSEABLE, "unparseable"),
        ("application/json", b"\xff\xfe", UNPARSEABLE, "unparseable"),
        ("application/x-www-form-urlencoded", b"a=1", None, "other"),
        ("application/json", b"", None, "none"),
    ],
)
def test_bodies(content_type, content, payload, kind):
    op = httpops.classify("api", "POST", "/x", {"content-type": content_type}, content)
    assert op.payload == payload if payload is not UNPARSEABLE else op.payload is UNPARSEABLE
    assert op.details["body"] == kind


FORM = {"content-type": "application/x-www-form-urlencoded"}


def multipart(name: str, value: str = "DELETE", boundary: str = "XyZ", extra: str = "") -> tuple[dict, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; {name}{extra}\r\n\r\n{value}\r\n--{boundary}--\r\n")
    return {"content-type": f"multipart/form-data; boundary={boundary}"}, body.encode()


BODY_OVERRIDES = [
    # (headers, body, action): the riskiest method any framework could read wins
    (FORM, b"_method=DELETE", "delete"),
    (FORM, b"_method=delete", "delete"),
    (FORM, b"title=x&_method=DELETE", "delete"),
    (FORM, b"_method=DELETE&_method=GET", "delete"),
    (FORM, b"_method=GET&_method=DELETE", "delete"),
    (FORM, b"%5Fmethod=DELETE", "delete"),
    (FORM, b"_method=%44ELETE", "delete"),
    (FORM, b"_method=+DELETE+", "delete"),
    (FORM, b"_METHOD=DELETE", "delete"),
    (FORM, b"_method[]=DELETE", "unknown"),
    (FORM, b"_method%00=DELETE", "unknown"),
    (FORM, b"_method=PURGE", "unknown"),
    ({"content-type": "application/x-www-form-urlencoded; charset=UTF-8"}, b"_method=DELETE", "delete"),
    ({"content-type": "APPLICATION/X-WWW-FORM-URLENCODED"}, b"_method=DELETE", "delete"),
    ({}, b"_method=DELETE", "delete"),  # Rack reads a POST without a content type as a form
    multipart('name="_method"') + ("delete",),
    multipart("name=_method") + ("delete",),
    multipart('name="_method"', "delete") + ("delete",),
    multipart('name="_method"', extra='; filename="m.txt"') + ("delete",),
    multipart('name="_method"', boundary='"quoted-b"')[:1] + (multipart('name="_method"', boundary="quoted-b")[1],) + ("delete",),
    multipart('name="_method[]"') + ("unknown",),
    ({"content-type": "application/json"}, b'{"_method": "DELETE"}', "delete"),
    ({"content-type": "application/json"}, b'{"_method": "DELETE", "_method": "POST"}', "unknown"),
    ({"content-type": "application/json"}, b'{"_method": ["DELETE"]}', "unknown"),
    ({"content-type": "application/vnd.api+json"}, b'{"a": 1, "_method": "delete"}', "delete"),
    # what is not an override
    (FORM, b"_method=", "write"),
    (FORM, b"_method=POST", "write"),
    (FORM, b"title=method", "write"),
    ({"content-type": "application/json"}, b'{"data": {"_method": "DELETE"}}', "write"),
    ({"content-type": "text/plain"}, b"_method=DELETE", "write"),
]


@pytest.mark.parametrize("headers, body, action", BODY_OVERRIDES)
def test_method_overrides_in_the_body(headers, body, action):
    op = httpops.classify("api", "POST", "/items", headers, body)
    assert op.action == action
    assert op.risk == httpops.RISK[action]


@pytest.mark.parametrize("path", ["/adm\u0131n", "/\u017fecret", "/\u212aey", "/ADM\u0130N", "/adm%C4%B1n"])
def test_paths_that_fold_into_ascii_are_ambiguous_when_case_is_folded(path):
    assert httpops.case_ambiguity(path) is not None


@pytest.mark.parametrize("path", ["/admin", "/ADMIN", "/caf\u00e9", "/%C3%A9t%C3%A9"])
def test_paths_that_fold_within_their_script_are_not(path):
    assert httpops.case_ambiguity(path) is None


def test_fold_case_folds_the_resource_and_says_so():
    op = httpops.fold_case(httpops.classify("ci", "GET", "/Admin/Users?x=1", {}, None))
    assert op.resource == "/admin/users" and op.details["path_case"] == "insensitive"
    assert op.summary == "GET /admin/users on ci"


@pytest.mark.parametrize(
    "fields, problem",
    [
        (((b"X-A", b"a\r\n b"),), "obsolete line folding"),
        (((b"X-A", b"a\r\n\tb"),), "obsolete line folding"),
        (((b"X-A", b"a\nb"),), "obsolete line folding"),
        (((b"X-A", b"a\x00b"),), "control character"),
        (((b"X-A", b"a\rb"),), "control character"),
        (((b"X-A", b"a\x1bb"),), "control character"),
        (((b"X-A", b"a\x7fb"),), "control character"),
        (((b"Host", b"a"), (b"host", b"a")), "more than one Host"),
        (((b"Host", b"a"), (b"Host", b"b")), "more than one Host"),
        (((b"X\x01A", b"v"),), "header name"),
        (((b"X-A", b"a\tb"), (b"Host", b"a")), None),
        (((b"X-A", "caf\u00e9".encode()),), None),
    ],
)
def test_header_problems(fields, problem):
    found = httpops.header_problem(fields, "HTTP/1.1")
    assert (found is None) if problem is None else (problem in found)
