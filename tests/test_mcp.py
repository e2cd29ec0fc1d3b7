"""MCP through a real gateway: the sample ticket desk (the official MCP Python SDK, over
Streamable HTTP with event-stream and JSON answers, over the older HTTP+SSE transport, and
as a stdio process the gateway runs) and the official SDK's client through the proxy.

What reached each server is read from the server's own log of the HTTP requests and tool
runs it received; what the gateway decided is read from the audit store."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
import yaml
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from mcp.types import CreateMessageResult, ElicitResult, TextContent

from addons.engine import mcp
from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import Gateway
from tests.support.mcp import SAMPLE, Background, Raw, TicketDesk, answer, session
from tests.support.servers import free_port

DESK_TOKEN = "desk-credential-5b1e9c2a"  # what the gateway holds for the ticket desks
DESK_SECRET = "sk-desk-7Hq2xLw9Vb3N"  # the desks' own API key, which show_config returns
LOCAL_SECRET = "sk-local-Zp8Kq4Rt6Ym1"  # the stdio desk's, only in its environment
EMAILS = ("dana.lee@example.com", "sam.ortiz@example.com", "it-ops@example.com")
TOOLS = {"search_tickets": "read", "show_config": "read", "create_ticket": "write", "delete_ticket": "delete",
         "summarize_ticket": "read", "close_ticket": "write"}
SESSION = ["initialize", "notifications/*", "ping", "tools/list", "custody/listen", "custody/close"]

RULES = {"mcp.yaml": {"rules": [
    {"id": "mcp-session", "match": {"connection": "tickets*", "mcp": {"methods": SESSION}}, "effect": "allow"},
    {"id": "agents-read", "match": {"connection": "tickets*", "principal": {"groups": ["agents"]},
                                    "mcp": {"tools": ["search_tickets", "show_config"]}},
     "effect": "allow", "masks": ["pii", {"fields": ["$.api_key"]}]},
    {"id": "agents-read-resources", "match": {"connection": "tickets*", "principal": {"groups": ["agents"]},
                                              "mcp": {"methods": ["resources/*", "prompts/*"]}},
     "effect": "allow", "masks": ["secrets"]},
    {"id": "plain-read", "match": {"connection": "tickets*", "principal": {"groups": ["plain"]},
                                   "mcp": {"tools": ["show_config"]}}, "effect": "allow"},
    {"id": "writers-create", "match": {"connection": "tickets*", "principal": {"groups": ["writers"]},
                                       "mcp": {"tools": "create_ticket"}}, "effect": "allow"},
    {"id": "no-sql-in-titles", "match": {"mcp": {"tools": "create_ticket", "arguments": [
        {"path": "$.title", "op": "matches", "value": "(?i)drop\\s+table"}]}},
     "effect": "deny", "reason": "ticket titles cannot carry SQL"},
    {"id": "urgent-reviewed", "match": {"mcp": {"tools": "create_ticket", "arguments": [
        {"path": "$.priority", "op": "equals", "value": "urgent"}]}},
     "effect": "review", "reason": "urgent tickets page someone",
     "review": {"approvers": ["group:managers"], "timeout": "1s", "ttl": "1h"}},
    {"id": "deletes-reviewed", "match": {"connection": "tickets*", "mcp": {"tools": "delete_ticket"}},
     "effect": "review", "reason": "deleting a ticket needs a manager",
     "review": {"approvers": ["group:managers"], "timeout": "30s"}},
    {"id": "agents-ask", "match": {"connection": "tickets*", "principal": {"groups": ["agents", "samplers"]},
                                   "mcp": {"tools": ["summarize_ticket", "close_ticket"]}}, "effect": "allow"},
    {"id": "samplers-sample", "match": {"principal": {"groups": ["samplers"]}, "mcp": {"sampling": True}},
     "effect": "allow"},
    {"id": "auditors-changed", "match": {"principal": {"groups": ["auditors"]},
                                         "mcp": {"changed": True, "tools": "search_tickets"}},
     "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "30s"}},
]}}


@pytest.fixture(scope="module")
def desks(tmp_path_factory):
    root = tmp_path_factory.mktemp("desks")
    made = {"sse": TicketDesk(root / "sse", DESK_TOKEN, DESK_SECRET),
            "json": TicketDesk(root / "json", DESK_TOKEN, DESK_SECRET, "--json-response"),
            "legacy": TicketDesk(root / "legacy", DESK_TOKEN, DESK_SECRET, "--transport", "sse"),
            "rug": TicketDesk(root / "rug", DESK_TOKEN, DESK_SECRET, "--rug-pull", str(root / "rug" / "pulled"))}
    yield made
    for desk in made.values():
        desk.stop()


def desk_connection(name: str, host: str, desk: TicketDesk, **mcp_settings) -> dict:
    return {"name": name, "kind": "mcp", "hosts": [host], "upstream": desk.url,
            "credential": {"type": "bearer", "secret": "env:DESK_TOKEN"}, "mcp": {"tools": TOOLS, **mcp_settings}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, desks, jwks):
    directory = tmp_path_factory.mktemp("mcp-gateway")
    local_log = directory / "local-desk.jsonl"
    local_log.write_text("")
    direct = free_port()
    connections = [
        desk_connection("tickets", "tickets.mcp.test", desks["sse"]),
        {**desk_connection("tickets-json", "json.mcp.test", desks["json"]), "listen": f"127.0.0.1:{direct}"},
        desk_connection("tickets-legacy", "legacy.mcp.test", desks["legacy"]),
        desk_connection("tickets-rug", "rug.mcp.test", desks["rug"]),
        {"name": "tickets-trusting", "kind": "mcp", "hosts": ["trusting.mcp.test"], "upstream": desks["json"].url,
         "credential": {"type": "bearer", "secret": "env:DESK_TOKEN"}, "mcp": {"trust_annotations": True}},
        {"name": "tickets-local", "kind": "mcp", "hosts": ["local.mcp.test"], "mcp": {"tools": TOOLS, "stdio": {
            "command": [sys.executable, str(SAMPLE), "--transport", "stdio", "--log", str(local_log)],
            "secrets": {"SAMPLE_MCP_SECRET": "env:LOCAL_SECRET"}}}},
    ]
    g = Gateway(directory, connections=connections, rules=RULES, identity=standard_identity(jwks),
                env={"DESK_TOKEN": DESK_TOKEN, "LOCAL_SECRET": LOCAL_SECRET})
    approvals = free_port()
    g.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    g.config_file.write_text(yaml.safe_dump(g.config))
    g.approvals_url, g.direct, g.local_log = f"http://127.0.0.1:{approvals}", direct, local_log
    g.start()
    wait_for(lambda: listening(g.approvals_url) and listening(f"http://127.0.0.1:{direct}"))
    yield g
    g.stop()


def run(coro):
    return asyncio.run(coro)


async def listed(gw, token, url, **kw) -> dict[str, str]:
    async with session(gw, token, url, **kw) as s:
        return {t.name: t.description or "" for t in (await s.list_tools()).tools}


async def call(gw, token, url, tool, arguments, **kw):
    async with session(gw, token, url, **kw) as s:
        return await s.call_tool(tool, arguments)


def text(result) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def audit_bytes(gw: Gateway) -> bytes:
    """Everything on disk of the audit store (the database and its write-ahead log)."""
    return b"".join(p.read_bytes() for p in gw.dir.glob("audit.db*"))


# tools/list


@pytest.mark.parametrize("groups, offered, needs_approval", [
    # urgent tickets (anyone's) and deletions are reviewed: offered to all, saying so
    (["agents"], {"search_tickets", "show_config", "summarize_ticket", "close_ticket", "delete_ticket",
                  "create_ticket"}, {"delete_ticket", "create_ticket"}),
    (["writers"], {"create_ticket", "delete_ticket"}, {"create_ticket", "delete_ticket"}),
    (["nobody"], {"create_ticket", "delete_ticket"}, {"create_ticket", "delete_ticket"}),
])
@pytest.mark.parametrize("url", ["http://tickets.mcp.test/mcp", "http://json.mcp.test/mcp"], ids=["sse", "json"])
def test_tools_list_offers_only_what_the_principal_may_call(gw, token, groups, offered, needs_approval, url):
    tools = run(listed(gw, token(sub=f"lister-{groups[0]}", groups=groups), url))
    assert set(tools) == offered
    assert {t for t, d in tools.items() if d.startswith("[Custody: calls to this tool wait")} == needs_approval
    event = gw.wait_events("kind = 'tools' AND subject = ?", [f"lister-{groups[0]}"])[-1]
    removed = json.loads(event["detail"])["removed"]
    assert set(removed) == set(TOOLS) - offered
    assert all(reason for reason in removed.values())


def test_annotations_decide_actions_only_where_the_configuration_trusts_them(gw, token):
    """tickets-trusting has no tool actions: the server's readOnlyHint makes search a read
    (so the read rule offers it); the rest are write or delete as annotated."""
    tools = run(listed(gw, token(sub="trusting", groups=["agents"]), "http://trusting.mcp.test/mcp"))
    assert {"search_tickets", "show_config"} <= set(tools)
    run(call(gw, token(sub="trusting", groups=["agents"]), "http://trusting.mcp.test/mcp", "search_tickets",
             {"query": "vpn"}))
    op = json.loads(gw.wait_events("kind = 'decision' AND subject = 'trusting' AND resource = 'search_tickets'")[-1]
                    ["operation"])
    assert (op["action"], op["details"]["action_from"], op["details"]["annotations"]["readOnlyHint"]) == \
        ("read", "annotations", True)
