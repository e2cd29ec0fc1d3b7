"""MCP as tables: JSON-RPC classification, refusal shapes, what masks reach in a message,
event-stream framing, tool fingerprints and pins, the `mcp:` rule block, and configuration."""

from __future__ import annotations

import json
import re

import pytest

from addons.classifiers import mcp as classifier
from addons.engine import config, mcp
from addons.engine.masks import Masker, MaskError, Report, parse_all
from addons.engine.mcpstate import Pins
from addons.engine.model import ANY_PAYLOAD, Operation, Principal, Request
from addons.engine.rules import RuleSet, parse_file
from addons.engine.sse import EventStream, StreamError


def post(body, **headers) -> Operation:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classifier.from_request("desk", Request("POST", "/mcp", tuple(headers.items()), content))


def rpc(rid, method, params=None) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": method, **({"params": params} if params is not None else {})}


# classification


@pytest.mark.parametrize("body, action, resource, kind, payload", [
    (rpc(1, "initialize", {"capabilities": {}}), "read", "initialize", "request", {"capabilities": {}}),
    (rpc(1, "tools/list"), "read", "tools/list", "request", None),
    (rpc(1, "tools/call", {"name": "search", "arguments": {"q": "x"}}), "exec", "search", "request", {"q": "x"}),
    (rpc(1, "tools/call", {"name": "search"}), "exec", "search", "request", {}),
    (rpc("a", "resources/read", {"uri": "file:///etc/hosts"}), "read", "file:///etc/hosts", "request",
     {"uri": "file:///etc/hosts"}),
    (rpc(2, "prompts/get", {"name": "triage"}), "read", "triage", "request", {"name": "triage"}),
    (rpc(2, "logging/setLevel", {"level": "debug"}), "write", "logging/setLevel", "request", {"level": "debug"}),
    (rpc(2, "tools/destroy"), "unknown", "tools/destroy", "request", None),
    ({"jsonrpc": "2.0", "method": "notifications/initialized"}, "read", "notifications/initialized", "notification",
     None),
    ({"jsonrpc": "2.0", "method": "notifications/whatever"}, "read", "notifications/whatever", "notification", None),
    ({"jsonrpc": "2.0", "id": 5, "result": {}}, "unknown", "(response)", "response", None),
])
def test_each_message_is_an_operation(body, action, resource, kind, payload):
    op = post(body)
    assert (op.protocol, op.action, op.resource, op.details["kind"], op.payload) == ("mcp", action, resource, kind,
                                                                                     payload)
    assert op.risk == (mcp.UNCONFIGURED_TOOL_RISK if resource == "search" else mcp.RISK[action])
    assert "invalid" not in op.details


@pytest.mark.parametrize("body, code, says", [
    (b"", mcp.PARSE_ERROR, "not one JSON document"),
    (b"\xff\xfe", mcp.PARSE_ERROR, "not one JSON document"),
    (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}', mcp.PARSE_ERROR, "not one JSON document"),
    (json.dumps("tools/list").encode(), mcp.INVALID_REQUEST, "must be a JSON object"),
    ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, mcp.INVALID_REQUEST, '"jsonrpc": "2.0"'),
    ({**rpc(1, "ping"), "id": None}, mcp.INVALID_REQUEST, "string or an integer"),
    ({**rpc(1, "ping"), "id": 1.5}, mcp.INVALID_REQUEST, "string or an integer"),
    ({**rpc(1, "ping"), "result": {}}, mcp.INVALID_REQUEST, "both a request and a response"),
    ({"jsonrpc": "2.0", "id": 1, "method": ""}, mcp.INVALID_REQUEST, "non-empty string"),
    ({"jsonrpc": "2.0", "id": 1, "method": 7}, mcp.INVALID_REQUEST, "non-empty string"),
    ({"jsonrpc": "2.0", "id": 1}, mcp.INVALID_REQUEST, "neither a request"),
    ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "x"}}, mcp.INVALID_REQUEST, "not both"),
    ({"jsonrpc": "2.0", "id": 1, "error": {"code": "bad", "message": "x"}}, mcp.INVALID_REQUEST, "integer code"),
    ({"jsonrpc": "2.0", "result": {}}, mcp.INVALID_REQUEST, "needs the id"),
    (rpc(1, "tools/call", {"name": "a" * 129}), mcp.INVALID_PARAMS, "tool name of 1-128"),
    (rpc(1, "tools/call", {"name": "../etc"}), mcp.INVALID_PARAMS, "tool name of 1-128"),
    (rpc(1, "tools/call", {"name": "[ab]"}), mcp.INVALID_PARAMS, "tool name of 1-128"),
    (rpc(1, "tools/call", {"arguments": {}}), mcp.INVALID_PARAMS, "tool name of 1-128"),
    (rpc(1, "resources/read", {}), mcp.INVALID_PARAMS, "needs a uri"),
    (rpc(1, "prompts/get", {"name": 3}), mcp.INVALID_PARAMS, "needs a name"),
])
def test_a_malformed_message_is_invalid_with_its_json_rpc_code(body, code, says):
    op = post(body)
    assert op.details["jsonrpc_code"] == code and says in op.details["invalid"]
    assert op.action == "unknown"


def test_a_batch_is_decided_message_by_message():
    op = post([rpc(1, "tools/list"), rpc(2, "tools/call", {"name": "drop", "arguments": {}}),
               {"jsonrpc": "2.0", "method": "notifications/progress"}])
    assert [p.resource for p in op.parts] == ["tools/list", "drop", "notifications/progress"]
    assert op.details["batch"] and op.action == "exec" and op.risk == mcp.UNCONFIGURED_TOOL_RISK


@pytest.mark.parametrize("method, headers, target, pseudo, session", [
    ("GET", {"mcp-session-id": "abc"}, "/mcp", mcp.LISTEN, "abc"),
    ("GET", {}, "/sse", mcp.LISTEN, ""),
    ("DELETE", {"mcp-session-id": "abc"}, "/mcp", mcp.CLOSE, "abc"),
    ("POST", {}, "/messages/?session_id=f00d", None, "f00d"),  # the older HTTP+SSE transport
    ("POST", {}, "/messages/?sessionId=beef", None, "beef"),
])
def test_transport_requests_and_where_the_session_is(method, headers, target, pseudo, session):
    op = classifier.from_request("desk", Request(method, target, tuple(headers.items()),
                                                 json.dumps(rpc(1, "ping")).encode() if method == "POST" else b""))
    assert op.details["session"] == session
    assert op.resource == (pseudo or "ping")


@pytest.mark.parametrize("method, session, says", [
    ("PUT", "", "MCP is POST, GET or DELETE"),
    ("POST", "a b", "visible ASCII"),
    ("POST", "x" * 257, "visible ASCII"),
])
def test_transport_misuse_is_invalid(method, session, says):
    headers = (("mcp-session-id", session),) if session else ()
    op = classifier.from_request("desk", Request(method, "/mcp", headers, json.dumps(rpc(1, "ping")).encode()))
    assert says in op.details["invalid"]


# refusals


def refused(op, status=403, error="denied_by_policy", **custody):
    body = {"decision": "deny", "error": error, "reason": "no", "rules": ["r1"], "event_id": "e1", **custody}
    status, content, content_type = mcp.refusal(op, status, error, body)
    return status, json.loads(content), content_type


@pytest.mark.parametrize("op, status, error, http_status, answered", [
    (post(rpc(7, "tools/call", {"name": "t"})), 403, "denied_by_policy", 200, [(7, mcp.REFUSED)]),
    (post(rpc(7, "tools/call", {"name": "t"})), 403, "approval_pending", 200, [(7, mcp.PENDING)]),
    (post(rpc(7, "tools/call", {"name": "t"})), 502, "audit_unavailable", 200, [(7, mcp.INTERNAL_ERROR)]),
    (post(rpc(7, "tools/call", {"name": "t"})), 404, "unknown_session", 404, [(7, mcp.REFUSED)]),
    (post({"jsonrpc": "2.0", "method": "notifications/x"}), 403, "denied_by_policy", 403, [(None, mcp.REFUSED)]),
    (post({"jsonrpc": "2.0", "id": 3, "result": {}}), 403, "denied_by_policy", 403, [(None, mcp.REFUSED)]),
    (post(b"{"), 400, "invalid_message", 400, [(None, mcp.PARSE_ERROR)]),
    (None, 400, "misdirected_request", 400, [(None, mcp.REFUSED)]),
    (post([rpc(1, "ping"), {"jsonrpc": "2.0", "method": "notifications/x"}, rpc("b", "ping")]), 403,
     "denied_by_policy", 200, [(1, mcp.REFUSED), ("b", mcp.REFUSED)]),
])
def test_a_refusal_answers_each_request_by_its_id(op, status, error, http_status, answered):
    got_status, body, content_type = refused(op, status, error)
    messages = body if isinstance(body, list) else [body]
    assert (got_status, content_type) == (http_status, "application/json")
    assert [(m["id"], m["error"]["code"]) for m in messages] == answered
    assert all(m["error"]["message"] == "custody: no (rules: r1; audit event e1)" or "invalid" in error
               for m in messages)
    assert all(m["error"]["data"]["event_id"] == "e1" for m in messages)


def test_a_hold_in_its_keepalive_window_is_an_event_to_resume_from():
    status, content, content_type = mcp.refusal(post(rpc(7, "tools/call", {"name": "t"})), 403, "approval_pending",
                                                {"reason": "waiting", "resume": "A1", "event_id": "e1"})
    assert (status, content_type) == (200, "text/event-stream")
    assert f"id: {mcp.RESUME_PREFIX}A1\nretry: {mcp.RETRY_MS}\ndata: \n\n".encode() in content


def test_a_client_that_came_back_reads_its_refusal_as_an_event():
    status, content, content_type = mcp.refusal(post(rpc(7, "tools/call", {"name": "t"})), 403, "approval_denied",
                                                {"reason": "no", "event_id": "e1"}, stream=True)
    assert (status, content_type) == (200, "text/event-stream")
    assert json.loads(content.decode().split("data: ", 1)[1])["error"]["code"] == mcp.REFUSED


# masking what a message carries


class Emails:
    """A detector that finds addresses ending in @example.com (masks' own tests use Presidio)."""

    def find(self, text, entities, threshold, name=""):
        from addons.engine.detectors import Finding

        return [Finding(m.start(), m.end(), "EMAIL_ADDRESS", 1.0) for m in re.finditer(r"\S+@example\.com", text)]


def masker(*masks) -> Masker:
    return Masker(parse_all(list(masks)), Emails(), b"k" * 32)


def result(**fields) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "result": fields}


@pytest.mark.parametrize("masks, message, expected", [
    ([{"fields": ["$.api_key"]}],
     result(content=[{"type": "text", "text": '{"api_key": "s3", "n": 1}'}], structuredContent={"api_key": "s3"}),
     result(content=[{"type": "text", "text": '{"api_key": "[REDACTED]", "n": 1}'}],
            structuredContent={"api_key": "[REDACTED]"})),
    (["pii"], result(content=[{"type": "text", "text": "mail dana@example.com\nor sam@example.com"}]),
     result(content=[{"type": "text", "text": "mail [EMAIL_ADDRESS]\nor [EMAIL_ADDRESS]"}])),
    (["secret-keys"], result(contents=[{"uri": "config://x", "text": '{"password": "p"}'}]),
     result(contents=[{"uri": "config://x", "text": '{"password": "[REDACTED]"}'}])),
    (["pii"], {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "no user dana@example.com",
                                                     "data": {"who": "sam@example.com"}}},
     {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "no user [EMAIL_ADDRESS]",
                                            "data": {"who": "[EMAIL_ADDRESS]"}}}),
    (["pii"], rpc(3, "tools/call", {"name": "mail", "arguments": {"to": "dana@example.com"}}),
     rpc(3, "tools/call", {"name": "mail", "arguments": {"to": "[EMAIL_ADDRESS]"}})),
    (["pii"], rpc(3, "sampling/createMessage", {"messages": [{"role": "user", "content": {
        "type": "text", "text": "dana@example.com"}}]}),
     rpc(3, "sampling/createMessage", {"messages": [{"role": "user", "content": {
         "type": "text", "text": "[EMAIL_ADDRESS]"}}]})),
    (["pii"], result(messages=[{"role": "user", "content": {"type": "text", "text": "hi dana@example.com"}}],
                     description="for sam@example.com"),
     result(messages=[{"role": "user", "content": {"type": "text", "text": "hi [EMAIL_ADDRESS]"}}],
            description="for [EMAIL_ADDRESS]")),
])
def test_masks_reach_what_a_message_carries_not_its_envelope(masks, message, expected):
    assert mcp.mask_message(masker(*masks), message, Report()) == expected


@pytest.mark.parametrize("masks, message, says", [
    ([{"keys": ["password"]}], result(content=[{"type": "text", "text": "password: hunter2"}]), "content[0]"),
    (["pii"], result(content=[{"type": "image", "data": "aGk=", "mimeType": "image/png"}]), "image data"),
    (["pii"], result(contents=[{"uri": "x", "blob": "aGk="}]), "blob"),
    (["pii"], result(content=[{"type": "resource", "resource": {"uri": "x", "blob": "aGk="}}]), "blob"),
])
def test_what_cannot_be_masked_is_refused(masks, message, says):
    with pytest.raises(MaskError, match=re.escape(says)):
        mcp.mask_message(masker(*masks), message, Report())


def test_a_body_of_several_messages_is_masked_each():
    body = json.dumps([result(structuredContent={"e": "a@example.com"}), result(structuredContent={"e": "x"})])
    out, report = mcp.mask_body(masker("pii"), body.encode())
    assert [m["result"]["structuredContent"]["e"] for m in json.loads(out)] == ["[EMAIL_ADDRESS]", "x"]
    assert report.masked == 1


def test_the_connections_own_secrets_are_removed_wherever_they_appear():
    report = Report()
    clean = mcp.scrub({"a": ["key sk-12345678 again sk-12345678"], "sk-12345678": 1, "short": "abc"},
                      ("sk-12345678", "abc"), report)
    assert clean == {"a": ["key [REDACTED] again [REDACTED]"], "[REDACTED]": 1, "short": "abc"}
    assert report.fields["connection secret"] == 3  # shorter secrets than SECRET_MIN are not searched for


# event streams


def collect(*chunks, max_event=100):
    seen = []
    stream = EventStream(lambda e: (seen.append(e.fields), e.encode())[1], max_event, keep=10_000)
    out = b"".join(stream(c) for c in (*chunks, b""))
    return seen, out, stream


@pytest.mark.parametrize("chunks, fields", [
    ([b"data: {}\n\n"], [[("data", "{}")]]),
    ([b"event: endpoint\r\ndata: /m?session_id=1\r\n\r\n"], [[("event", "endpoint"), ("data", "/m?session_id=1")]]),
    ([b"data: {\"a\"", b":1}\r", b"\n\r\n"], [[("data", '{"a":1}')]]),  # CRLF split across chunks
    ([b"id: 7\rdata: x\r\r"], [[("id", "7"), ("data", "x")]]),  # bare CR line ends
    ([b": ping\n\ndata: a\ndata: b\n\n"], [[("", "ping")], [("data", "a"), ("data", "b")]]),
    ([b"data: incomplete at the end"], []),
])
def test_event_streams_are_cut_into_events(chunks, fields):
    seen, _, _ = collect(*chunks)
    assert seen == fields


def test_an_event_longer_than_allowed_ends_the_stream():
    with pytest.raises(StreamError, match="longer than 100 bytes"):
        collect(b"data: " + b"x" * 200)
    with pytest.raises(StreamError, match="not UTF-8"):
        collect(b"data: \xff\n\n")


# tool definitions


TOOL = {"name": "search", "description": "Search.", "inputSchema": {"type": "object", "properties": {}},
        "annotations": {"readOnlyHint": True}}


def test_a_tool_fingerprint_is_sha256_of_what_a_model_reads():
    assert mcp.tool_fingerprint(TOOL) == mcp.tool_fingerprint(dict(reversed(list(TOOL.items()))))
    assert mcp.tool_fingerprint({**TOOL, "_meta": {"x": 1}}) == mcp.tool_fingerprint(TOOL)
    for change in ({"description": "Search. And mail it out."}, {"inputSchema": {"type": "object"}},
                   {"annotations": {"readOnlyHint": False}}, {"title": "S"}):
        assert mcp.tool_fingerprint({**TOOL, **change}) != mcp.tool_fingerprint(TOOL)


@pytest.mark.parametrize("annotations, action", [
    ({"readOnlyHint": True}, "read"),
    ({"readOnlyHint": True, "destructiveHint": True}, "read"),
    ({"destructiveHint": True}, "delete"),
    ({"destructiveHint": False}, "write"),
    ({}, "delete"),  # the specification's defaults: not read-only, destructive
    (None, "delete"),
])
def test_annotations_claim_an_action(annotations, action):
    assert mcp.annotated_action(annotations) == action


def connection(**settings) -> config.Connection:
    return config.Connection("desk", "mcp", ("desk.test",), mcp=config.McpSettings(**settings))


@pytest.mark.parametrize("settings, listings, outcomes", [
    ({}, [TOOL, TOOL], ["pinned", "same"]),
    ({}, [TOOL, {**TOOL, "description": "x"}, {**TOOL, "description": "x"}, TOOL], ["pinned", "changed", "changed",
                                                                                       "same"]),
    ({"pins": (("search", mcp.tool_fingerprint(TOOL)),)}, [TOOL], ["same"]),
    ({"pins": (("search", "0" * 64),)}, [TOOL], ["changed"]),
    ({"new_tools": "refuse"}, [TOOL], ["unpinned"]),
])
def test_pins_are_kept_when_first_seen_or_configured(settings, listings, outcomes):
    conn = connection(**settings)
    pins = Pins()
    pins.configure((conn,), [])
    got = [pins.see(conn, t) for t in listings]
    assert [s.outcome for s in got] == outcomes
    if outcomes[:2] == ["pinned", "changed"]:
        assert [s.news for s in got] == [True, True, False, False]  # each change is news once
        assert pins.get("desk", "search").fingerprint == mcp.tool_fingerprint(TOOL)  # the pin never moves


def test_configured_tool_actions_exact_names_first_then_globs_in_order():
    settings = config.McpSettings(tools=(("delete_*", "delete"), ("*", "read"), ("delete_draft", "write")))
    assert [settings.action(t) for t in ("delete_draft", "delete_all", "search")] == ["write", "delete", "read"]
    assert config.McpSettings().action("search") is None


# the mcp: rule block


ALICE = Principal("alice", "iss", ("agents",))


def ruleset(*rules) -> RuleSet:
    return RuleSet(parse_file({"rules": list(rules)}, "mcp.yaml"))


def tool_call(tool, arguments, action="exec", **details) -> Operation:
    return Operation("mcp", "desk", action, tool, 50, f"tools/call {tool}",
                     {"method": "tools/call", "kind": "request", "id": 1, "tool": tool, **details}, payload=arguments)


def server_request(method) -> Operation:
    return Operation("mcp", "desk", mcp.SERVER_METHODS.get(method, "unknown"), method, 50, method,
                     {"method": method, "kind": "request", "id": 1, "initiator": "server"})


RULES = [
    {"id": "allow-all", "match": {"connection": "desk"}, "effect": "allow"},
    {"id": "search", "match": {"mcp": {"tools": "search_*"}}, "effect": "allow"},
    {"id": "no-prod", "match": {"mcp": {"tools": "delete_*", "arguments": [
        {"path": "$.path", "op": "matches", "value": "^/prod"}]}}, "effect": "deny"},
    {"id": "big-review", "match": {"mcp": {"tools": "pay", "arguments": [{"path": "$.amount", "op": "gt", "value": 100}]}},
     "effect": "review", "review": {"approvers": ["group:managers"]}},
    {"id": "sampling-ok", "match": {"principal": {"groups": ["samplers"]}, "mcp": {"sampling": True}}, "effect": "allow"},
    {"id": "roots-ok", "match": {"mcp": {"methods": "roots/list"}}, "effect": "allow"},
    {"id": "changed-review", "match": {"principal": {"groups": ["auditors"]}, "mcp": {"changed": True}},
     "effect": "review", "review": {"approvers": ["group:managers"]}},
]


@pytest.mark.parametrize("principal, op, effect, rules, error", [
    (ALICE, tool_call("search_x", {}), "allow", ["allow-all", "search"], ""),
    (ALICE, tool_call("delete_x", {"path": "/prod/db"}), "deny", ["no-prod"], "denied_by_policy"),
    (ALICE, tool_call("delete_x", {"path": "/tmp"}), "allow", ["allow-all"], ""),
    (ALICE, tool_call("delete_x", {"path": 3}), "deny", ["no-prod"], "denied_by_policy"),  # cannot judge: deny holds
    (ALICE, tool_call("pay", {"amount": 500}), "review", ["big-review"], ""),
    (ALICE, tool_call("pay", {"amount": 5}), "allow", ["allow-all"], ""),
    # listing (any arguments): a deny that needs arguments does not remove; a review that may apply says so
    (ALICE, tool_call("delete_x", ANY_PAYLOAD), "allow", ["allow-all"], ""),
    (ALICE, tool_call("pay", ANY_PAYLOAD), "review", ["big-review"], ""),
    # the server asking: only rules that name it
    (ALICE, server_request("sampling/createMessage"), "deny", [], "no_matching_rule"),
    (Principal("s", "iss", ("samplers",)), server_request("sampling/createMessage"), "allow", ["sampling-ok"], ""),
    (ALICE, server_request("elicitation/create"), "deny", [], "no_matching_rule"),
    (ALICE, server_request("roots/list"), "allow", ["roots-ok"], ""),
    (ALICE, server_request("ping"), "deny", [], "no_matching_rule"),
    # a changed tool: only rules that name changed
    (ALICE, tool_call("search_x", {}, changed=True, pinned="a" * 64, listed="b" * 64), "deny", [], "tool_changed"),
    (Principal("a", "iss", ("auditors",)), tool_call("search_x", {}, changed=True), "review", ["changed-review"], ""),
])
def test_the_mcp_rule_block_decides(principal, op, effect, rules, error):
    d = ruleset(*RULES).decide(principal, op)
    assert (d.effect, list(d.rules), d.error) == (effect, rules, error)


def test_a_refused_sampling_or_changed_tool_says_what_would_allow_it():
    rules = ruleset(RULES[0])
    assert "(mcp.sampling: true)" in rules.decide(ALICE, server_request("sampling/createMessage")).reason
    changed = rules.decide(ALICE, tool_call("t", {}, changed=True, pinned="a" * 64, listed="b" * 64))
    assert changed.reason.startswith("the definition of tool t changed since it was pinned (aaaaaaaaaaaa… → bbbbbbbbbbbb…)")


def test_a_batch_names_the_message_that_decided_it():
    op = post([rpc(1, "tools/call", {"name": "search_x", "arguments": {}}),
               rpc(2, "tools/call", {"name": "delete_x", "arguments": {"path": "/prod"}})])
    d = ruleset(*RULES).decide(ALICE, op)
    assert d.effect == "deny" and d.reason.startswith("message 2 (delete_x): ")


@pytest.mark.parametrize("match, says", [
    ({"mcp": {"arguments": [{"path": "$[", "op": "exists"}]}}, "match.mcp.arguments[0].path: not a JSONPath"),
    ({"mcp": {"arguments": [{"path": "$.a", "op": "matches", "value": "("}]}}, "not a regular expression"),
    ({"mcp": {"tool": "x"}}, "match.mcp: unknown field ('tool' was unexpected)"),
    ({"mcp": {"sampling": "yes"}}, "is not of type 'boolean'"),
])
def test_invalid_mcp_blocks_name_the_rule_and_field(match, says):
    from addons.engine.rules import RuleError

    with pytest.raises(RuleError, match=re.escape(says)):
        parse_file({"rules": [{"id": "r", "match": match, "effect": "allow"}]}, "mcp.yaml")


# configuration


BASE = {"store": {"path": "audit.db"}, "rules": "rules"}


@pytest.mark.parametrize("conn, says", [
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"]}, "needs either upstream"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "upstream": "http://x:1", "mcp": {"stdio": {"command": ["x"]}}},
     "needs either upstream"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "mcp": {"stdio": {"command": ["x"]}},
      "credential": {"type": "bearer", "secret": "env:HOME"}}, "environment (mcp.stdio.secrets)"),
    ({"name": "d", "kind": "http", "hosts": ["d.test"], "mcp": {"tools": {}}}, "mcp: only for mcp connections"),
    ({"name": "d", "kind": "http", "hosts": ["d.test"], "credential": {
        "type": "oauth", "secret": "env:HOME", "token_url": "http://t", "client_id": "c"}}, "oauth is for mcp"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "upstream": "http://x:1",
      "credential": {"type": "oauth", "secret": "env:HOME"}}, "'token_url' is a required property"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "upstream": "http://x:1", "mcp": {"tools": {"x": "sudo"}}},
     "is not one of"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "upstream": "http://x:1", "mcp": {"pins": {"x": "abc"}}},
     "does not match"),
    ({"name": "d", "kind": "mcp", "hosts": ["d.test"], "mcp": {"stdio": {"command": ["x"],
                                                                         "secrets": {"K": "env:NO_SUCH_VAR_X"}}}},
     "mcp.stdio.secrets.K: environment variable NO_SUCH_VAR_X is not set"),
])
def test_mcp_connection_errors_name_the_field(tmp_path, conn, says):
    with pytest.raises(config.ConfigError, match=re.escape(says)):
        config.parse({**BASE, "connections": [conn]}, str(tmp_path / "custody.yaml"))


def test_an_mcp_connection_parses_into_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DESK_KEY", "k-123456789")
    cfg = config.parse({**BASE, "connections": [{
        "name": "d", "kind": "mcp", "hosts": ["d.test"], "mcp": {
            "tools": {"search": "read", "delete_*": "delete"}, "trust_annotations": True, "keepalive": "10s",
            "pins": {"search": "sha256:" + "a" * 64}, "new_tools": "refuse",
            "stdio": {"command": ["npx", "-y", "@x/server"], "env": {"LOG": "debug"}, "secrets": {"KEY": "env:DESK_KEY"},
                      "max_sessions": 2, "idle": "1m", "timeout": "30s"}}}]}, str(tmp_path / "custody.yaml"))
    conn = cfg.connections[0]
    assert conn.mcp == config.McpSettings(
        tools=(("search", "read"), ("delete_*", "delete")), trust_annotations=True, pins=(("search", "a" * 64),),
        new_tools="refuse", keepalive=10.0, stdio=config.StdioServer(
            command=("npx", "-y", "@x/server"), env=(("LOG", "debug"),), secrets=(("KEY", "k-123456789"),),
            max_sessions=2, idle=60.0, timeout=30.0))
    assert conn.secrets == ("k-123456789",) and conn.bearer_is_gateway  # MCP clients send their token as a bearer
    assert "k-123456789" not in repr(conn)
    without = config.parse({**BASE, "connections": [{"name": "d", "kind": "mcp", "hosts": ["d.test"], "mcp": {
        "stdio": {"command": ["x"], "secrets": {"KEY": "env:DESK_KEY"}}}}]}, str(tmp_path / "c.yaml"), secrets=False)
    assert without.connections[0].mcp.stdio.secrets == (("KEY", ""),)
