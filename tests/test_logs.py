"""Structured logs: with `log.format: json` a real gateway's output is JSON lines, and the
lines about a flow name the flow and the events that put it on record, so a log line leads
to its audit record (read back from the store)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import standard_gateway
from tests.support.gateway import ROOT, Gateway
from tests.support.servers import Route

FAULTS = str(ROOT / "tests" / "support" / "faults.py")


def lines(gw: Gateway) -> list[dict]:
    """The gateway's output from its first JSON line on, every line parsed (a line that is
    not JSON fails the test)."""
    out = gw.log().splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("{"))
    return [json.loads(line) for line in out[first:] if line.strip()]


def wait_line(gw: Gateway, predicate) -> dict:
    from tests.support.approvals import wait_for

    return wait_for(lambda: next((line for line in lines(gw) if predicate(line)), None))


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, upstream):
    upstream.routes["/items/logged"] = Route("application/json", b'{"ok": true}')
    # mitmdump prints every flow itself unless told not to (custody run has no flow printer)
    gateway = standard_gateway(tmp_path_factory.mktemp("logs"), servers, scripts=(FAULTS,), options=("flow_detail=0",))
    gateway.config["log"] = {"format": "json"}
    gateway.config_file.write_text(yaml.safe_dump(gateway.config))
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture
def agent(gw, keys, jwks):
    return gw.session(keys["rsa"].token(jwks.issuer, sub="ana", groups=["analysts"]))


def test_every_line_is_a_json_object_with_time_level_and_message(gw, agent):
    agent.get("http://api.test/items/logged?token=hunter2")
    wait_line(gw, lambda line: line["logger"] == "custody.requests")
    found = lines(gw)
    assert any("proxy listening at 127.0.0.1" in line["message"] for line in found)
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in found)
    assert all(line["ts"].endswith("+00:00") for line in found)


@pytest.mark.parametrize("path, status, effect, kinds", [
    ("/items/logged", 200, "allow", ["request", "decision", "response"]),
    ("/admin/logged", 403, "deny", ["request", "decision", "response"]),
])
def test_a_request_line_names_the_events_of_its_audit_record(gw, agent, path, status, effect, kinds):
    reply = agent.get(f"http://api.test{path}?token=hunter2")
    assert reply.status_code == status
    line = wait_line(gw, lambda line: line["logger"] == "custody.requests" and line["path"] == path)
    assert (line["status"], line["effect"], line["principal"], line["connection"]) == (status, effect, "ana", "api")
    assert line["host"] == "api.test" and "hunter2" not in json.dumps(line)  # never the query
    records = [gw.event(event_id) for event_id in line["events"]]
    assert [r["kind"] for r in records] == kinds
    assert {r["flow"] for r in records} == {line["flow"]}
    assert line["decision_event"] in line["events"]
    if effect == "deny":
        assert reply.json()["event_id"] == line["decision_event"]


def test_an_error_line_names_the_flow_it_refused(gw, agent, upstream):
    """The store refuses the request's write: the error line names the flow, whose refusal
    (its decision, then the response) is on record under the same flow id."""
    reply = agent.get("http://api.test/items/logged-fault", headers={"x-test-fault": "store"})
    assert (reply.status_code, reply.json()["error"]) == (503, "audit_unavailable")
    assert not [g for g in upstream.received if g.path == "/items/logged-fault"]
    error = wait_line(gw, lambda line: line["level"] == "error" and "audit store write failed" in line["message"])
    assert "injected fault in store" in error["exception"]
    assert error["events"] == []  # nothing of it was on record when it failed
    request = wait_line(gw, lambda line: line["logger"] == "custody.requests" and line["path"] == "/items/logged-fault")
    assert request["flow"] == error["flow"]
    records = [gw.event(e) for e in request["events"]]
    assert [r["kind"] for r in records] == ["decision", "response"]
    assert {r["flow"] for r in records} == {error["flow"]}
    assert reply.json()["event_id"] == request["decision_event"] == records[0]["id"]


def test_text_stays_the_default(tmp_path, servers, keys, jwks):
    gw = standard_gateway(tmp_path, servers).start()
    try:
        assert gw.session(keys["rsa"].token(jwks.issuer, groups=["analysts"])).get(
            "http://api.test/items/1").status_code == 200
        assert "proxy listening at 127.0.0.1" in gw.log()
        assert not [line for line in gw.log().splitlines() if line.startswith("{")]
    finally:
        gw.stop()


def test_a_log_format_that_is_not_one_is_refused(tmp_path, servers):
    gw = standard_gateway(tmp_path, servers)
    gw.config["log"] = {"format": "xml"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    status, output = gw.run_to_exit()
    assert status == 1
    assert "log.format" in output
