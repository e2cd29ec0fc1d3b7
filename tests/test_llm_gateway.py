"""Model traffic through a real gateway: the openai and anthropic SDKs calling the example's
stand-in model served over HTTPS (examples/sample_model.py), in both wire formats, whole and
streamed; a faulty model server (the suite's upstream, answering what no provider should)
for answers that are not completions; and requests that the model's tool calls asked for,
or did not: to an API, to the sample MCP ticket desk, and to a real sshd through
ssh_bridge.

What reached the model server is read from its own log; what the gateway decided and
recorded is read from the audit store."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncssh

import openai
import pytest
import requests
import yaml

from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import Gateway
from tests.support.llm import ModelServer, anthropic_client, openai_client
from tests.support.mcp import Raw, TicketDesk, answer
from tests.support.pgbridge import BridgeProcess
from tests.support.servers import Route, Upstream, free_port
from tests.test_ssh import sshd  # noqa: F401  (the fixture: a real sshd)

MODEL = "custody-standin/scripted-1"
PLANTED = "ghp_" + "Rt7Yb2Qx9Lm4Vn8Kc3Zs6Hw1Jd5Fp0Ge2Ua7X"
EMAIL = "sam.ortiz@example.com"
PLANS = {
    "fetch": [["inventory_api", {"method": "GET", "path": "/items"}]],
    "order": [["inventory_api", {"method": "POST", "path": "/orders", "body": {"item": 1, "quantity": 500}}]],
    "small-order": [["inventory_api", {"method": "POST", "path": "/orders", "body": {"item": 2, "quantity": 5}}]],
    "leak": [{"say": f"Write to {EMAIL} with the key {PLANTED}."}],
    "triage": [["search_tickets", {"query": "VPN"}]],
    "host": [["ssh", {"command": "uname -s"}]],
}
DESK_TOKEN, DESK_SECRET = "desk-credential-4c2f", "sk-desk-9Tz1"
TOOLS = {"chat": [{"type": "function", "function": {"name": "inventory_api", "parameters": {"type": "object"}}}],
         "responses": [{"type": "function", "name": "inventory_api", "parameters": {"type": "object"}}],
         "messages": [{"name": "inventory_api", "input_schema": {"type": "object"}}]}
RULES = {
    "llm.yaml": {"rules": [
        {"id": "models-listed", "match": {"connection": ["openai", "anthropic"], "llm": {"endpoints": "models"}},
         "effect": "allow"},
        {"id": "standin", "match": {"connection": ["openai", "anthropic", "broken"],
                                    "principal": {"groups": ["agents", "careful"]},
                                    "llm": {"models": "custody-standin/*", "max_tokens": 2048,
                                            "endpoints": ["chat", "responses", "messages"]}}, "effect": "allow"},
        {"id": "careful-masked", "match": {"connection": ["openai", "anthropic"], "principal": {"groups": ["careful"]},
                                           "llm": {"models": "custody-standin/*"}},
         "effect": "allow", "masks": ["secrets", "pii"]}]},
    "api.yaml": {"rules": [
        {"id": "api-read", "match": {"connection": "api", "action": "read"}, "effect": "allow"},
        {"id": "writes-the-model-asked-for", "match": {"connection": "api", "action": "write",
                                                       "provenance": "required"}, "effect": "allow"},
        {"id": "unasked-writes-denied", "match": {"connection": "api", "action": ["write", "delete"],
                                                  "provenance": "none"},
         "effect": "deny", "reason": "no model output asked for this write"},
        {"id": "large-orders-reviewed", "match": {"connection": "api", "method": "POST", "path": "/orders",
                                                  "body": [{"path": "$.quantity", "op": "gt", "value": 100}]},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "1s"}}]},
    "tickets.yaml": {"rules": [
        {"id": "tickets-session", "match": {"connection": "tickets", "mcp": {"methods": ["initialize", "notifications/*",
                                                                                      "tools/list"]}},
         "effect": "allow"},
        {"id": "searches-the-model-asked-for", "match": {"connection": "tickets", "mcp": {"tools": "search_tickets"},
                                                         "provenance": "required"}, "effect": "allow"},
        {"id": "commands-the-model-asked-for", "match": {"connection": "web", "provenance": "required"},
         "effect": "allow"},
        {"id": "unasked-commands-denied", "match": {"connection": "web", "provenance": "none"}, "effect": "deny",
         "reason": "no model output asked for this command"},
        {"id": "unasked-searches-denied", "match": {"connection": "tickets", "mcp": {"tools": "search_tickets"},
                                                    "provenance": "none"}, "effect": "deny"}]},
}


def sse(*events: dict | str) -> list[bytes]:
    return [(f"data: {e}\n\n" if isinstance(e, str) else f"data: {json.dumps(e)}\n\n").encode() for e in events]


def chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


CALL_START = chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_cut", "type": "function",
                                                          "function": {"name": "inventory_api", "arguments": ""}}]})
ARGUMENTS = chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"method": "GET", "path": "/items"}'}}]})
FAULTS = {
    "/garbled/v1/chat/completions": Route("text/html", b"<html><body>upstream proxy error</body></html>"),
    "/nochoices/v1/chat/completions": Route("application/json", json.dumps({"id": "x", "object": "chat.completion",
                                                                           "model": MODEL}).encode()),
    "/notjson/v1/chat/completions": Route("application/json", json.dumps({
        "id": "x", "object": "chat.completion", "model": MODEL, "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_bad", "type": "function", "function": {"name": "inventory_api", "arguments": "/items"}}]}}]}
    ).encode()),
    # a tool call's arguments cut in the middle of a record: the stream ends without its blank line
    "/cut/v1/chat/completions": Route("text/event-stream", chunks=[
        *sse(CALL_START), b'data: {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "fu']),
    # every record whole, but the stream ends before [DONE]
    "/early/v1/chat/completions": Route("text/event-stream", chunks=sse(CALL_START, ARGUMENTS)),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    server = ModelServer(tmp_path_factory.mktemp("model"), PLANS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api():
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faulty():
    server = Upstream()
    server.routes.update(FAULTS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    server = TicketDesk(tmp_path_factory.mktemp("desk"), DESK_TOKEN, DESK_SECRET, "--json-response")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, jwks, model, api, faulty, desk, sshd):  # noqa: F811  (sshd: the fixture imported above)
    directory = tmp_path_factory.mktemp("llm-gateway")
    ssh_port = free_port()
    connections = [
        {"name": "openai", "kind": "llm", "hosts": ["models.test"], "upstream": model.url,
         "tls": {"ca_file": str(model.ca)}, "credential": {"type": "bearer", "secret": "env:MODEL_KEY"},
         "llm": {"api": "openai"}},
        {"name": "anthropic", "kind": "llm", "hosts": ["claude.test"], "upstream": model.url,
         "tls": {"ca_file": str(model.ca)}, "credential": {"type": "header", "header": "x-api-key",
                                                          "secret": "env:MODEL_KEY"}, "llm": {"api": "anthropic"}},
        {"name": "broken", "kind": "llm", "hosts": ["broken.test"], "upstream": f"http://127.0.0.1:{faulty.port}",
         "llm": {"api": "openai"}},
        {"name": "api", "kind": "http", "hosts": ["api.test"], "upstream": f"http://127.0.0.1:{api.port}"},
        {"name": "tickets", "kind": "mcp", "hosts": ["tickets.mcp.test"], "upstream": desk.url,
         "credential": {"type": "bearer", "secret": "env:DESK_TOKEN"}, "mcp": {"tools": {"search_tickets": "read"}}},
        {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}",
         "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"}, "known_hosts": str(sshd.known_hosts),
         "listen": f"127.0.0.1:{ssh_port}", "host_key": str(directory / "bridge_host_key")},
    ]
    g = Gateway(directory, connections=connections, rules=RULES, identity=standard_identity(jwks),
                env={"MODEL_KEY": model.key, "DESK_TOKEN": DESK_TOKEN})
    approvals = free_port()
    g.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    g.config_file.write_text(yaml.safe_dump(g.config))
    g.approvals_url, g.ssh_port = f"http://127.0.0.1:{approvals}", ssh_port
    g.start()
    wait_for(lambda: listening(g.approvals_url))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def bridge(gw, tmp_path_factory):
    process = BridgeProcess(gw, gw.ssh_port, tmp_path_factory.mktemp("ssh-bridge") / "bridge.log", module="ssh_bridge")
    yield process
    process.stop()


def agent(token, groups=("agents",)) -> tuple[str, str]:
    """A principal of its own (its events are easy to find) and its token."""
    subject = f"agent-{uuid.uuid4().hex[:8]}"
    return subject, token(sub=subject, groups=list(groups))


def events(gw: Gateway, kind: str, subject: str, timeout: float = 10) -> list[dict]:
    rows = gw.wait_events("kind = ? AND subject = ?", [kind, subject], timeout=timeout)
    for r in rows:
        for column in ("operation", "detail", "principal"):
            r[column] = json.loads(r[column]) if r[column] else {}
    return rows


def ask(gw: Gateway, tok: str, key: str, endpoint: str = "chat", stream: bool = False, run: str = "run-1",
        tools: bool = True, note: str = "") -> dict:
    """One model call through the gateway with the real SDK; what it asked for, as the SDK read it."""
    headers = {"x-custody-run": run}
    said = f"Task key: {key} {note}".strip()
    if endpoint == "messages":
        client = anthropic_client(gw, tok, "claude.test", **headers)
        kw = {"model": MODEL, "max_tokens": 500, "messages": [{"role": "user", "content": said}],
              **({"tools": TOOLS["messages"]} if tools else {})}
        if stream:
            with client.messages.stream(**kw) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(**kw)
        text = "".join(b.text for b in message.content if b.type == "text")
        calls = [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
        return {"text": text, "calls": calls}
    client = openai_client(gw, tok, "models.test", **headers)
    if endpoint == "responses":
        kw = {"model": MODEL, "max_output_tokens": 500, "input": said,
              **({"tools": TOOLS["responses"]} if tools else {})}
        if stream:
            with client.responses.stream(**kw) as s:
                response = s.get_final_response()
        else:
            response = client.responses.create(**kw)
        calls = [(i.call_id, i.name, json.loads(i.arguments)) for i in response.output if i.type == "function_call"]
        return {"text": response.output_text, "calls": calls}
    kw = {"model": MODEL, "max_tokens": 500, "messages": [{"role": "user", "content": said}],
          **({"tools": TOOLS["chat"]} if tools else {}), **({"stream_options": {"include_usage": True}} if stream else {})}
    if stream:
        with client.chat.completions.stream(**kw) as s:
            message = s.get_final_completion().choices[0].message
    else:
        message = client.chat.completions.create(**kw).choices[0].message
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    return {"text": message.content or "", "calls": calls}


# model calls


@pytest.mark.parametrize("endpoint", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_model_call_reaches_the_provider_with_its_key_and_goes_on_record(gw, model, token, endpoint, stream):
    subject, tok = agent(token)
    marker = uuid.uuid4().hex
    answer = ask(gw, tok, "fetch", endpoint, stream, note=marker)
    assert [(name, arguments) for _, name, arguments in answer["calls"]] == [
        ("inventory_api", {"method": "GET", "path": "/items"})]
    reached = [r for r in model.received() if marker in r["body"]]
    assert len(reached) == 1 and tok not in json.dumps(reached[0])  # the provider never sees the agent's token
    key = reached[0]["headers"]["x-api-key" if endpoint == "messages" else "authorization"]
    assert key.removeprefix("Bearer ") == model.key
    completion = events(gw, "completion", subject)[0]
    d = completion["detail"]
    assert (d["endpoint"], d["streamed"], d["complete"], d["model"]) == (endpoint, stream, True, MODEL)
    assert [(c["id"], c["name"], c["arguments"], c["form"]) for c in d["tool_calls"]] == [
        (answer["calls"][0][0], "inventory_api", {"method": "GET", "path": "/items"}, "function")]
    assert d["usage"]["input_tokens"] > 0 and d["usage"]["output_tokens"] > 0
    request = events(gw, "request", subject)[0]
    assert request["resource"] == MODEL and request["operation"]["details"]["tools"] == ["inventory_api"]


def test_model_listings_are_read_with_the_gateways_key(gw, model, token):
    _, tok = agent(token)
    assert [m.id for m in openai_client(gw, tok, "models.test").models.list()] == [MODEL]


# provenance


def asked_for(gw: Gateway, token, key: str, form: str = "function", run: str = "run-1", groups=("agents",)):
    """A principal whose model asked for the plan `key`'s first step, and the completion event."""
    subject, tok = agent(token, groups)
    answer = ask(gw, tok, key, run=run, tools=form == "function")
    completion = events(gw, "completion", subject)[0]
    call = answer["calls"][0][0] if form == "function" else f"{completion['id']}#0"
    return subject, tok, completion, call


@pytest.mark.parametrize("form", ["function", "react"])
@pytest.mark.parametrize("who, run, method, path, match", [
    ("same", "run-1", "GET", "/items", "exact"),
    ("same", "run-1", "GET", "//items/", "normalised"),  # the same resource, as servers resolve the path
    ("same", "run-1", "GET", "/items?limit=5", "none"),  # something else than the model asked for
    ("same", "run-1", "HEAD", "/items", "none"),
    ("same", "run-2", "GET", "/items", "none"),  # another crew run of the same principal
    ("other", "run-1", "GET", "/items", "none"),  # another principal
])
def test_a_request_carries_provenance_to_the_tool_call_that_asked_for_it(gw, token, form, who, run, method, path,
                                                                         match):
    subject, tok, completion, call = asked_for(gw, token, "fetch", form)
    if who == "other":
        subject, tok = agent(token)
    r = gw.session(tok).request(method, f"http://api.test{path}", headers={"x-custody-run": run}, timeout=30)
    assert r.status_code == 200
    found = events(gw, "decision", subject)[-1]["operation"]["details"]["provenance"]
    assert found["match"] == match, found
    if match == "none":
        assert "no model output seen by the gateway asked for it" in found["reason"]
        return
    assert (found["event"], found["tool_call"], found["tool"], found["form"], found["model"]) == (
        completion["id"], call, "inventory_api", form, MODEL)
    assert found["arguments"] == {"method": "GET", "path": "/items"} and found["flow"] == completion["flow"]


@pytest.mark.parametrize("asked, body, headers, status, error, provenance", [
    (True, {"item": 2, "quantity": 5}, {}, 200, None, "exact"),
    (False, {"item": 2, "quantity": 5}, {}, 403, "denied_by_policy", "none"),
    # a request claiming a model and a prompt it has no output from: a claim is not provenance
    (False, {"item": 2, "quantity": 5}, {"x-custody-model": MODEL, "x-custody-prompt": "call_0001"}, 403,
     "denied_by_policy", "none"),
    (True, {"item": 2, "quantity": 50}, {}, 403, "denied_by_policy", "none"),  # the tool changed what was asked
    (True, {"quantity": 5, "item": 2}, {}, 200, None, "normalised"),  # the same document, its keys reordered
])
def test_writes_need_a_model_that_asked_for_them(gw, api, token, asked, body, headers, status, error, provenance):
    if asked:
        subject, tok, _, _ = asked_for(gw, token, "small-order")
    else:
        subject, tok = agent(token)
    marker = uuid.uuid4().hex
    r = gw.session(tok).post("http://api.test/orders", data=json.dumps(body), timeout=30, headers={
        "x-custody-run": "run-1", "content-type": "application/json", "x-test-marker": marker, **headers})
    found = events(gw, "decision", subject)[-1]
    provenance_of = found["operation"]["details"]["provenance"]
    reached = [g for g in api.received if g.headers.get("x-test-marker") == marker]
    if status == 200:
        assert r.status_code == 200 and len(reached) == 1
    else:
        assert (r.status_code, r.json()["error"], r.json()["rules"]) == (status, error, ["unasked-writes-denied"])
        assert reached == []
    assert provenance_of["match"] == provenance
    if headers:
        assert provenance_of["asserted"] == {"model": MODEL, "prompt": "call_0001"}


def search(query: str, rid: int) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": "search_tickets", "arguments": {"query": query}}}


@pytest.mark.parametrize("asked, body, outcomes, provenance", [
    (True, search("VPN", 1), {1: "ran"}, ["exact"]),
    (True, search("printer", 1), {1: "denied_by_policy"}, ["none"]),  # not what the model asked for
    (False, search("VPN", 1), {1: "denied_by_policy"}, ["none"]),
    # a batch is judged message by message: the one the model asked for alone would run, so neither does
    (True, [search("VPN", 1), search("payroll", 2)], {1: "denied_by_policy", 2: "denied_by_policy"},
     ["exact", "none"]),
])
def test_an_mcp_tool_call_carries_provenance_by_tool_and_arguments(gw, token, desk, asked, body, outcomes, provenance):
    if asked:
        subject, tok, completion, call = asked_for(gw, token, "triage")
    else:
        subject, tok = agent(token)
    before = len(desk.calls("search_tickets"))
    raw = Raw(gw, tok, "http://tickets.mcp.test/mcp")
    raw.http.headers["x-custody-run"] = "run-1"
    raw.initialize()
    r = raw.post(body)
    assert r.status_code == 200, r.text
    answers = {m["id"]: m for m in (r.json() if isinstance(body, list) else [answer(r)])}
    assert {rid: "ran" if "result" in m else m["error"]["data"]["error"] for rid, m in answers.items()} == outcomes
    assert len(desk.calls("search_tickets")) == before + sum(o == "ran" for o in outcomes.values())
    decision = [e for e in events(gw, "decision", subject)
                if e["operation"]["details"].get("method") in ("tools/call", "(batch)")][-1]
    parts = decision["operation"].get("parts") or [decision["operation"]]
    assert [p["details"]["provenance"]["match"] for p in parts] == provenance
    if provenance[0] == "exact":
        found = parts[0]["details"]["provenance"]
        assert (found["event"], found["tool_call"], found["tool"], found["arguments"]) == (
            completion["id"], call, "search_tickets", {"query": "VPN"})


async def on_host(gw: Gateway, tok: str, command: str) -> asyncssh.SSHCompletedProcess:
    """One command through ssh_bridge with asyncssh, the crew run in the session's environment."""
    async with asyncssh.connect("127.0.0.1", gw.ssh_port, username="agent+web", password=tok, known_hosts=None,
                                client_keys=None, agent_path=None, config=None) as conn:
        return await conn.run(command, env={"CUSTODY_RUN": "run-1"})


@pytest.mark.parametrize("asked, command, exit_status, provenance", [
    (True, "uname -s", 0, "exact"),
    (True, "uname  '-s'", 0, "normalised"),  # the same words, quoted and spaced otherwise
    (True, "uname -a", 126, "none"),  # not what the model asked for
    (True, "uname -s; id", 126, "none"),  # more than it asked for
    (False, "uname -s", 126, "none"),
])
def test_an_ssh_command_carries_provenance_by_its_words(gw, bridge, token, asked, command, exit_status, provenance):
    if asked:
        subject, tok, completion, call = asked_for(gw, token, "host")
    else:
        subject, tok = agent(token)
    done = asyncio.run(on_host(gw, tok, command))
    assert done.exit_status == exit_status, done.stderr
    if exit_status == 0:
        assert done.stdout.strip() == "Linux"
    else:
        assert done.stderr.startswith("custody: ") and done.stdout == ""
        assert "no model output asked for this command (rules: unasked-commands-denied" in done.stderr
    found = [e["operation"]["details"]["provenance"] for e in events(gw, "decision", subject)
             if e["protocol"] == "ssh" and e["operation"]["details"]["provenance"]["match"] != "n/a"]
    assert [f["match"] for f in found] == [provenance]
    if provenance != "none":
        assert (found[0]["event"], found[0]["tool_call"], found[0]["arguments"]) == (
            completion["id"], call, {"command": "uname -s"})


def test_approvers_see_the_model_output_that_asked_for_the_request(gw, api, token):
    subject, tok, completion, call = asked_for(gw, token, "order")
    r = gw.session(tok).post("http://api.test/orders", json={"item": 1, "quantity": 500},
                             headers={"x-custody-run": "run-1"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"] == "approval_pending"
    approver = Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))
    held = next(a for a in approver.list() if a["requester"]["subject"] == subject)
    p = held["provenance"]
    assert (p["match"], p["tool"], p["tool_call"], p["event"], p["model"]) == (
        "exact", "inventory_api", call, completion["id"], MODEL)
    assert p["completion"] == 'inventory_api({"method": "POST", "path": "/orders", "body": {"item": 1, "quantity": 500}})'
    shown = approver.show(held["id"])
    assert shown["provenance"] == p


# what the model sees, and what comes back


@pytest.mark.parametrize("endpoint", ["chat", "responses", "messages"])
def test_a_planted_secret_in_a_prompt_never_reaches_the_model_server(gw, model, token, endpoint):
    subject, tok = agent(token, ("careful",))
    marker = uuid.uuid4().hex
    said = f"Task key: none {marker}. Our deploy key is {PLANTED}; write to {EMAIL}."
    if endpoint == "messages":
        anthropic_client(gw, tok, "claude.test").messages.create(
            model=MODEL, max_tokens=100, system=f"You help {EMAIL}.", messages=[{"role": "user", "content": said}])
    elif endpoint == "responses":
        openai_client(gw, tok, "models.test").responses.create(model=MODEL, max_output_tokens=100, input=said,
                                                               instructions=f"The key is {PLANTED}.")
    else:
        openai_client(gw, tok, "models.test").chat.completions.create(model=MODEL, max_tokens=100, messages=[
            {"role": "system", "content": f"The key is {PLANTED}."}, {"role": "user", "content": said},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "lookup", "arguments": json.dumps({"who": EMAIL})}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"owner": EMAIL, "token": PLANTED})}])
    reached = [r for r in model.received() if marker in r["body"]]
    assert len(reached) == 1
    assert PLANTED not in reached[0]["body"] and EMAIL not in reached[0]["body"]
    assert "[GITHUB_TOKEN]" in reached[0]["body"] and "[EMAIL_ADDRESS]" in reached[0]["body"]
    request = events(gw, "request", subject)[0]
    assert PLANTED.encode() not in request["body"] and b"[GITHUB_TOKEN]" in request["body"]  # as it left
    decision = events(gw, "decision", subject)[0]
    assert PLANTED not in json.dumps(request["operation"]) + json.dumps(decision["operation"])  # its last message too


@pytest.mark.parametrize("endpoint", ["chat", "responses", "messages"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_completion_is_masked_before_the_agent_has_it_even_split_across_deltas(gw, token, endpoint, stream):
    subject, tok = agent(token, ("careful",))
    text = ask(gw, tok, "leak", endpoint, stream, tools=False)["text"]
    assert text == "Write to [EMAIL_ADDRESS] with the key [GITHUB_TOKEN]."
    recorded = events(gw, "completion", subject)[0]["detail"]
    assert recorded["text"] == text and recorded["complete"]
    response = events(gw, "response", subject)[0]
    assert PLANTED.encode() not in response["body"] and EMAIL.encode() not in response["body"]


def test_a_prompt_that_cannot_be_masked_is_refused_and_never_sent(gw, model, token):
    _, tok = agent(token, ("careful",))
    marker = uuid.uuid4().hex
    with pytest.raises(openai.PermissionDeniedError) as refused:
        openai_client(gw, tok, "models.test").chat.completions.create(model=MODEL, max_tokens=100, messages=[
            {"role": "user", "content": [{"type": "text", "text": marker},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    said = refused.value.response.json()
    assert said["error"] == "masking_refused" and "messages[0].content[1] is image_url data" in said["reason"]
    assert not [r for r in model.received() if marker in r["body"]]


# what is refused


def raw(gw: Gateway, tok: str, method: str, url: str, body: bytes) -> requests.Response:
    """A request no SDK would send, through the gateway, the agent's token as the API key."""
    return gw.session(None).request(method, url, data=body, timeout=30, headers={
        "authorization": f"Bearer {tok}", "content-type": "application/json"})


def chat(**fields) -> dict:
    return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "MARKER"}], **fields}


BAD = [
    ("anthropic messages to an openai connection", "POST", "https://models.test/v1/messages",
     {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "MARKER"}]},
     400, "invalid_model_request", "openai speaks OpenAI's API (Chat Completions, Responses), and /v1/messages is "
                                   "Anthropic Messages"),
    ("an anthropic body to chat completions", "POST", "https://models.test/v1/chat/completions",
     chat(system="be brief"), 400, "invalid_model_request",
     "a top-level system prompt is Anthropic Messages, not OpenAI Chat Completions"),
    ("anthropic content blocks in chat completions", "POST", "https://models.test/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "MARKER"}]}]),
     400, "invalid_model_request", "messages[0] has Anthropic content blocks"),
    ("chat completions to an anthropic connection", "POST", "https://claude.test/v1/chat/completions", chat(),
     400, "invalid_model_request", "anthropic speaks Anthropic's API (Messages), and /v1/chat/completions is OpenAI "
                                   "Chat Completions"),
    ("not JSON", "POST", "https://models.test/v1/chat/completions", b"MARKER {", 400, "invalid_model_request",
     "the body is not one JSON document"),
    ("duplicate keys", "POST", "https://models.test/v1/chat/completions",
     b'{"model": "custody-standin/scripted-1", "model": "gpt-4o", "max_tokens": 9, "messages": '
     b'[{"role": "user", "content": "MARKER"}]}', 400, "invalid_model_request", "no duplicate keys"),
    ("no model", "POST", "https://models.test/v1/chat/completions", {**chat(), "model": ""}, 400,
     "invalid_model_request", "model must be a non-empty string"),
    ("max_tokens not a number", "POST", "https://models.test/v1/chat/completions", chat(max_tokens="many"), 400,
     "invalid_model_request", 'max_tokens must be a positive integer (got "many")'),
    ("a tool call in the history with arguments that are not a string", "POST",
     "https://models.test/v1/chat/completions", chat(messages=[
         {"role": "user", "content": "MARKER"},
         {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                               "function": {"name": "sql", "arguments": {"q": 1}}}]}]),
     400, "invalid_model_request", "messages[1].tool_calls[0].function.arguments must be a string"),
    ("anthropic messages without max_tokens", "POST", "https://claude.test/v1/messages",
     {"model": MODEL, "messages": [{"role": "user", "content": "MARKER"}]}, 400, "invalid_model_request",
     "max_tokens is required by Anthropic Messages"),
    ("a completion endpoint read with GET", "GET", "https://models.test/v1/chat/completions?m=MARKER", b"", 400,
     "invalid_model_request", "OpenAI Chat Completions is POST, not GET"),
    ("max_tokens over the limit", "POST", "https://models.test/v1/chat/completions", chat(max_tokens=4096), 403,
     "no_matching_rule", "max_tokens 4096 is over the limit of rule standin (2048)"),
    ("no max_tokens", "POST", "https://models.test/v1/chat/completions",
     {k: v for k, v in chat().items() if k != "max_tokens"}, 403, "no_matching_rule",
     "the call does not say max_tokens, and rule standin allows at most 2048"),
    ("an unknown model", "POST", "https://models.test/v1/chat/completions", chat(model="gpt-9-preview"), 403,
     "no_matching_rule", "model 'gpt-9-preview' is not one you may use on openai (rule standin allows "
                         "custody-standin/*)"),
]


@pytest.mark.parametrize("name, method, url, body, status, error, reason", BAD, ids=[b[0] for b in BAD])
def test_a_bad_model_call_is_refused_precisely_and_never_reaches_the_provider(gw, model, token, name, method, url,
                                                                             body, status, error, reason):
    subject, tok = agent(token)
    marker = uuid.uuid4().hex
    content = (body if isinstance(body, bytes) else json.dumps(body).encode()).replace(b"MARKER", marker.encode())
    r = raw(gw, tok, method, url.replace("MARKER", marker), content)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert reason in r.json()["reason"]
    assert not [x for x in model.received() if marker in x["body"] or marker in x["path"]]
    assert events(gw, "decision", subject)[0]["effect"] == "deny"


@pytest.mark.parametrize("route, reason", [
    ("/garbled", "the model server's answer is not a completion of OpenAI Chat Completions (Expecting value"),
    ("/nochoices", "is not a completion of OpenAI Chat Completions (no choices: not a Chat Completions answer)"),
])
def test_an_answer_that_is_not_a_completion_is_withheld(gw, token, route, reason):
    subject, tok = agent(token)
    r = raw(gw, tok, "POST", f"https://broken.test{route}/v1/chat/completions", json.dumps(chat()).encode())
    assert (r.status_code, r.json()["error"]) == (502, "invalid_completion") and reason in r.json()["reason"]
    assert b"upstream proxy error" not in r.content
    assert events(gw, "completion", subject, timeout=1) == []


@pytest.mark.parametrize("route, failure", [
    ("/cut", "custody: the stream was cut off mid-record"),
    ("/early", "custody: the stream ended before the completion did"),
])
def test_a_stream_that_stops_short_ends_with_an_error_and_asks_for_nothing(gw, api, token, route, failure):
    subject, tok = agent(token)
    client = openai_client(gw, tok, "broken.test", route, **{"x-custody-run": "run-1"})
    seen = []
    with pytest.raises(openai.APIError) as cut:
        for c in client.chat.completions.create(model=MODEL, max_tokens=100, stream=True, messages=[
                {"role": "user", "content": "go"}]):
            seen.append(c)
    assert failure in str(cut.value)
    assert seen and seen[0].choices[0].delta.tool_calls[0].id == "call_cut"  # what came whole was passed on
    completion = events(gw, "completion", subject)[0]["detail"]
    assert completion["complete"] is False and completion["error"] == failure.removeprefix("custody: ")
    gw.session(tok).get("http://api.test/items", headers={"x-custody-run": "run-1"}, timeout=30)
    found = events(gw, "decision", subject)[-1]["operation"]["details"]["provenance"]
    assert found["match"] == "none" and "no tool calls of this principal and run remembered" in found["reason"]


def test_a_tool_call_whose_arguments_are_not_json_is_recorded_and_never_taken_as_asked(gw, token):
    subject, tok = agent(token)
    client = openai_client(gw, tok, "broken.test", "/notjson", **{"x-custody-run": "run-1"})
    message = client.chat.completions.create(model=MODEL, max_tokens=100, messages=[
        {"role": "user", "content": "go"}]).choices[0].message
    assert message.tool_calls[0].function.arguments == "/items"  # the agent gets what the model said
    call = events(gw, "completion", subject)[0]["detail"]["tool_calls"][0]
    assert (call["id"], call["arguments"], call["invalid"]) == ("call_bad", "/items", "the arguments are not JSON")
    gw.session(tok).get("http://api.test/items", headers={"x-custody-run": "run-1"}, timeout=30)
    assert events(gw, "decision", subject)[-1]["operation"]["details"]["provenance"]["match"] == "none"


# evidence


def test_custody_audit_why_tells_the_chain_from_either_end(gw, token, tmp_path):
    subject, tok, completion, call = asked_for(gw, token, "small-order")
    gw.session(tok).post("http://api.test/orders", json={"item": 2, "quantity": 5},
                         headers={"x-custody-run": "run-1"}, timeout=30)
    decision = events(gw, "decision", subject)[-1]
    forward = gw.custody("audit", "why", decision["id"])
    assert forward.returncode == 0, forward.stderr
    labels = [line.split()[0] for line in forward.stdout.splitlines()[1:] if line[:1] != " "]
    assert labels == ["PROMPT", "COMPLETION", "COMMAND", "DECISION", "RESPONSE"], forward.stdout
    assert f"TOOL CALL {call} inventory_api" in forward.stdout
    assert f"PROVENANCE exact: tool call {call} (inventory_api) of completion {completion['id']}" in forward.stdout
    backward = gw.custody("audit", "why", str(completion["seq"]))
    assert "COMMANDS    1 request(s)" in backward.stdout and "POST /orders on api" in backward.stdout
    unasked, unasked_tok = agent(token)
    gw.session(unasked_tok).get("http://api.test/items", timeout=30)
    alone = gw.custody("audit", "why", events(gw, "decision", unasked)[0]["id"]).stdout
    assert "PROMPT      none: no model output seen by the gateway asked for this request" in alone
    as_json = json.loads(gw.custody("audit", "why", decision["id"], "--json").stdout)
    assert as_json["provenance"]["tool_call"] == call and as_json["model_call"][0]["kind"] == "request"
    made = gw.custody("audit", "report", "--from", "2000-01-01", "-o", str(tmp_path / "report"))
    assert made.returncode == 0, made.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    row = next(r for r in report["provenance"] if r["principal"] == subject)
    assert (row["provenance"], row["tool_call"], row["decision"], row["status"], row["completion_event"]) == (
        "exact", call, "allow", 200, completion["id"])
    assert "Task key: small-order" in row["prompt"]
    html = (tmp_path / "report.html").read_text()
    assert re.search(r'<table id="provenance">.*' + re.escape(call), html, re.S)
