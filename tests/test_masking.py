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
    gw.config["masking"] = {"workers": 1, "timeout": "4s", "max_body": 4 * 1024 * 1024, "max_record": 4096}
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
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
    # the breaking sitecustomize first, then the code under test (not an installed copy)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent / "support" / "broken"), os.environ.get("PYTHONPATH"))
                           if p)
    env = {"PYTHONPATH": path, "CUSTODY_TEST_BREAK_DETECTOR": "1", "TEST_API_TOKEN": API_TOKEN}
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
