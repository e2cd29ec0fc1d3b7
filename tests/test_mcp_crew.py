"""The example crew's MCP task: CrewAI's own MCP integration (`mcps=`, the official SDK's
client underneath) reaches the sample ticket desk only through a real gateway, which
offers it only the tools its rules allow, masks what comes back, and records the call with
the agent, model, run and task that made it. Its own gateway and desk, on free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import standard_identity
from tests.support.gateway import ROOT, Gateway
from tests.support.mcp import TicketDesk

DESK_TOKEN = "crew-desk-credential-91c0"
DESK_SECRET = "sk-crew-desk-4Lr8Wq"
RULES = {"mcp.yaml": {"rules": [
    {"id": "mcp-session", "match": {"connection": "tickets", "mcp": {"methods": [
        "initialize", "notifications/*", "ping", "tools/list", "custody/listen", "custody/close"]}}, "effect": "allow"},
    {"id": "triagers-search", "match": {"connection": "tickets", "principal": {"groups": ["triagers"]},
                                        "mcp": {"tools": "search_tickets"}}, "effect": "allow", "masks": ["pii"]},
]}}


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    d = TicketDesk(tmp_path_factory.mktemp("crew-desk"), DESK_TOKEN, DESK_SECRET)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, desk, jwks):
    g = Gateway(tmp_path_factory.mktemp("crew-gateway"), rules=RULES, identity=standard_identity(jwks),
                connections=[{"name": "tickets", "kind": "mcp", "hosts": ["tickets.mcp.internal"], "upstream": desk.url,
                              "credential": {"type": "bearer", "secret": "env:DESK_TOKEN"},
                              "mcp": {"tools": {"search_tickets": "read", "create_ticket": "write",
                                                "delete_ticket": "delete", "show_config": "read"}}}],
                env={"DESK_TOKEN": DESK_TOKEN}).start()
    yield g
    g.stop()


def test_the_example_crew_uses_an_mcp_tool_through_the_gateway(gw, desk, token, tmp_path):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HOME=str(tmp_path), CREWAI_STORAGE_DIR=str(tmp_path / "crewai"), PYTHONPATH=str(ROOT),
               CUSTODY_TOKEN=token(sub="crew-triager", groups=["triagers"], ttl=900),
               CUSTODY_PROXY_URL=f"http://127.0.0.1:{gw.port}", CUSTODY_CA=str(gw.ca),
               CREW_MCP_URL="http://tickets.mcp.internal/mcp", CREW_TASKS="triage")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "crewai" / "crew.py")], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    triage = done.stdout.split("task triage: ", 1)[1]  # the stand-in's answer quotes what the tool returned
    assert "VPN drops every hour" in triage and "[EMAIL_ADDRESS]" in triage and "sam.ortiz" not in triage
    assert desk.calls("search_tickets") == [{"tool": "search_tickets", "arguments": {"query": "VPN"}}]
    offered = json.loads(gw.wait_events("kind = 'tools' AND subject = 'crew-triager'")[0]["detail"])
    assert offered["offered"] == ["search_tickets"]  # the model was never offered what it may not call
    call = gw.wait_events("kind = 'request' AND subject = 'crew-triager' AND resource = 'search_tickets'")
    assert len(call) == 1
    principal = json.loads(call[0]["principal"])["asserted"]
    run = done.stdout.split("run: ", 1)[1].split()[0]
    assert (principal["agent"], principal["task"], principal["model"], principal["run"], principal["prompt"]) == (
        "Help-desk triager", "triage", "custody-standin/scripted-1", run,
        "tool:tickets_mcp_internal_mcp_search_tickets")
    response = gw.wait_events("kind = 'response' AND flow = ?", [call[0]["flow"]])[0]
    assert b"sam.ortiz@example.com" not in response["body"] and b"[EMAIL_ADDRESS]" in response["body"]
