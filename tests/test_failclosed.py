"""Failing closed inside mitmproxy: when any addon breaks, the flow is refused, the agent is
told why in JSON, nothing (more) reaches the upstream, and the chain survives to serve the
next request."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.conftest import standard_gateway
from tests.support.gateway import ROOT, Gateway


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, servers) -> Gateway:
    gw = standard_gateway(
        tmp_path_factory.mktemp("faulty"), servers, scripts=(str(ROOT / "tests" / "support" / "faults.py"),)
    ).start()
    yield gw
    gw.stop()


@pytest.mark.parametrize(
    "fault, status, error, reason, reached",
    [
        ("identity", 502, "gateway_error", "internal error in the identity addon (request): RuntimeError", False),
        ("identity-headers", 502, "gateway_error", "internal error in the identity addon (request): RuntimeError", False),
        ("classify", 502, "gateway_error", "internal error in the classify addon (request): RuntimeError", False),
        ("policy", 502, "gateway_error", "internal error in the policy addon (request): RuntimeError", False),
        ("recorder", 502, "gateway_error", "internal error in the recorder addon (request): RuntimeError", False),
        ("store", 503, "audit_unavailable", "audit store unavailable (RuntimeError); nothing was forwarded", False),
        ("credentials", 502, "gateway_error", "internal error in the credentials addon (request): RuntimeError", False),
        ("recorder@response", 502, "gateway_error", "internal error in the recorder addon (response): RuntimeError", True),
        ("store@response", 502, "audit_unavailable", "audit store unavailable (RuntimeError); response withheld", True),
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_failing_addon_refuses_the_flow(faulty, token, upstream, fault, status, error, reason, reached, scheme):
    s = faulty.session(token(groups=["analysts"]))
    before = len(upstream.received)
    r = s.get(f"{scheme}://api.test/items/{fault}", headers={"X-Test-Fault": fault})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert (answer["decision"], answer["error"], answer["reason"]) == ("deny", error, reason)
    assert "items" not in r.text  # the upstream's body never reaches the agent
    assert (len(upstream.received) > before) is reached
    if error == "gateway_error" and fault != "recorder" and not reached:
        decision = faulty.event(answer["event_id"])
        assert decision["effect"] == "deny" and decision["reason"] == reason
    # and the gateway carries on
    assert s.get(f"{scheme}://api.test/items/after").status_code == 200


def raw_connect(port: int, target: str, token: str, extra: str = "") -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n{extra}\r\n".encode())
        response = http.client.HTTPResponse(sock, method="CONNECT")
        response.begin()
        return response.status, json.loads(response.read(int(response.getheader("content-length"))))


def test_a_failing_addon_on_the_connect_refuses_the_tunnel(faulty, token, upstream):
    before = len(upstream.received)
    status, body = raw_connect(faulty.port, "api.test:443", token(), "X-Test-Fault: identity\r\n")
    assert status == 502
    assert body["reason"] == "internal error in the identity addon (http_connect): RuntimeError"
    assert len(upstream.received) == before


def test_when_the_chain_fails_to_reload_the_gate_refuses_everything(tmp_path, servers, upstream, token):
    """mitmproxy reloads an edited script; if the new one is broken, no Custody addon is
    left in the chain. The gate, which lives outside it, then refuses every flow."""
    script = tmp_path / "mychain.py"
    script.write_text("from addons import chain\nchain._install_gate()\naddons = chain.build()\n")
    gw = standard_gateway(tmp_path, servers, chain=script).start()
    try:
        s = gw.session(token(groups=["analysts"]))
        assert s.get("http://api.test/items").status_code == 200
        script.write_text("this is not python (\n")
        deadline = time.monotonic() + 10
        while "error in script" not in gw.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        before = len(upstream.received)
        for url in ("http://api.test/items", "http://anything.example/"):
            r = s.get(url)
            assert r.status_code == 502
            assert r.json()["error"] == "not_cleared"
        status, body = raw_connect(gw.port, "api.test:443", token())
        assert status == 502 and body["error"] == "not_cleared"
        assert len(upstream.received) == before
    finally:
        gw.stop()
