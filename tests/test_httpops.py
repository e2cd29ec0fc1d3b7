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
