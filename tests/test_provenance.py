"""Provenance on its own (addons/engine/provenance.py, addons/classifiers/forms.py): which
tool call a request matches, in its protocol's normal form; what the ledger remembers and
for how long; and the rules that read model calls (`llm:`) and provenance (`provenance:`)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from addons.classifiers import forms, http, kubernetes, llm, mcp, postgres, ssh
from addons.engine import provenance
from addons.engine.model import Principal, Request
from addons.engine.provenance import Asked, Ledger, key_of
from addons.engine.rules import RuleError, RuleSet, parse_file

AGENT = Principal("crew-1", "https://idp", ("agents",), asserted={"run": "run-1"})


def asked(tool: str, arguments, n: int = 0, at: float = 100.0, expires: float = 1e12) -> Asked:
    return Asked(event=f"ev{n}", flow="f", connection="models", model="m", call=f"call_{n}", tool=tool,
                 arguments=arguments, text=json.dumps(arguments), form="function", at=at, expires=expires)


def bridged(kind, phase: str, body: dict):
    header = {"postgres": "pg-bridge-session", "ssh": "ssh-bridge-session"}[kind.__name__.rsplit(".", 1)[-1]]
    request = Request("POST", f"/{phase}", ((header, "s1"),), json.dumps(body).encode())
    return kind.from_request("c", request), request


def sql(text: str):
    return bridged(postgres, "execute", {"sql": text})


def line(text: str):
    return bridged(ssh, "exec", {"command": text})


def get(path: str, method: str = "GET", body: bytes | None = None):
    request = Request(method, path, (("content-type", "application/json"),), body)
    return http.from_request("api", request), request


def kube(path: str, method: str = "GET"):
    request = Request(method, path)
    return kubernetes.from_request("k8s", request), request


def tool_call(name: str, arguments: dict):
    request = Request("POST", "/mcp", (("content-type", "application/json"),), json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": name, "arguments": arguments}}).encode())
    return mcp.from_request("tickets", request), request


def judge(command, calls: list[Asked], host: str = "api.test") -> str:
    op, request = command
    found = forms.command(op, request, host)
    if found is None:
        return "n/a"
    hit = provenance.match(found, calls, lambda a: forms.asked_forms(a, host))
    return hit[1] if hit else "none"


# which request a tool call asked for


@pytest.mark.parametrize("command, calls, match", [
    # SQL by parse tree: constants count, case, spacing, comments and a trailing semicolon do not
    (sql("SELECT id FROM users WHERE id = 1"), [asked("sql", {"query": "SELECT id FROM users WHERE id = 1"})], "exact"),
    (sql("SELECT id FROM users WHERE id = 1;"), [asked("sql", {"query": "SELECT id FROM users WHERE id = 1"})], "exact"),
    (sql("select id  from users -- mine\n where id=1"), [asked("sql", {"query": "SELECT id FROM users WHERE id = 1"})],
     "normalised"),
    (sql("SELECT id FROM users WHERE id = 2"), [asked("sql", {"query": "SELECT id FROM users WHERE id = 1"})], "none"),
    (sql("SELECT 1; DROP TABLE users"), [asked("sql", {"query": "SELECT 1"})], "none"),  # more than was asked
    (sql("SELECT 1; DROP TABLE users"), [asked("run", {"statements": ["x", "SELECT 1; DROP TABLE users"]})], "exact"),
    (sql("SELECT 1"), [asked("notes", {"text": "please SELECT 1 for me"})], "none"),  # a mention is not a statement
    (sql("BEGIN"), [], "n/a"), (sql("COMMIT"), [], "n/a"),  # what drivers send around statements
    (bridged(postgres, "connect", {"database": "shop", "user": "agent"}), [], "n/a"),
    # shell by words
    (line("ls -l /srv"), [asked("ssh", {"command": "ls -l /srv"})], "exact"),
    (line("ls  -l '/srv'"), [asked("ssh", {"command": "ls -l /srv"})], "normalised"),
    (line("ls -l /srv; rm -rf /srv"), [asked("ssh", {"command": "ls -l /srv"})], "none"),
    (line("uptime"), [asked("shell", "uptime")], "exact"),  # ReAct: the input as written
    (bridged(ssh, "connect", {}), [], "n/a"),
    # HTTP by method, path and body
    (get("/items"), [asked("api", {"method": "GET", "path": "/items"})], "exact"),
    (get("/items"), [asked("fetch", {"url": "https://api.test/items"})], "exact"),  # no method named: GET
    (get("/items"), [asked("fetch", {"url": "https://elsewhere.test/items"})], "none"),  # another host
    (get("/a//items/"), [asked("api", {"method": "GET", "path": "/a/items"})], "normalised"),
    (get("/items?b=2&a=1"), [asked("api", {"path": "/items?a=1&b=2"})], "normalised"),
    (get("/items?a=1"), [asked("api", {"path": "/items"})], "none"),
    (get("/items", "DELETE"), [asked("api", {"path": "/items"})], "none"),  # asked to read, not to delete
    (get("/orders", "POST", json.dumps({"item": 1, "qty": 5}).encode()),
     [asked("api", {"method": "post", "path": "/orders", "body": {"item": 1, "qty": 5}})], "exact"),
    (get("/orders", "POST", b'{"qty":5,"item":1}'),
     [asked("api", {"method": "POST", "path": "/orders", "body": {"item": 1, "qty": 5}})], "normalised"),
    (get("/orders", "POST", b'{"item": 1, "qty": 50}'),
     [asked("api", {"method": "POST", "path": "/orders", "body": {"item": 1, "qty": 5}})], "none"),
    (get("/orders", "POST", b'{"item": 1}'), [asked("api", {"method": "POST", "path": "/orders"})], "none"),
    (get("/orders", "POST", b'{"item": 1}'), [asked("shell", {"command": "curl -X POST https://api.test/orders "
                                                                        "-d '{\"item\": 1}'"})], "exact"),
    # kubectl's words, as the API server request they make
    (kube("/api/v1/namespaces/shop/pods?limit=500"), [asked("kubectl", {"args": "get pods -n shop"})], "normalised"),
    (kube("/api/v1/namespaces/shop/pods/web-1"), [asked("shell", {"command": "kubectl get po web-1 -n shop"})],
     "normalised"),
    (kube("/api/v1/namespaces/shop/pods"), [asked("kubectl", {"args": "get pods"})], "normalised"),  # its default
    (kube("/api/v1/pods"), [asked("kubectl", {"args": "get pods -A"})], "normalised"),
    (kube("/api/v1/namespaces/shop/pods"), [asked("kubectl", {"args": "get pods -n other"})], "none"),
    (kube("/api/v1/namespaces/shop/pods/web-1", "DELETE"), [asked("kubectl", {"args": "get pods -n shop"})], "none"),
    (kube("/api/v1/namespaces/shop/pods/web-1/log"), [asked("kubectl", {"args": "logs web-1 -n shop"})], "normalised"),
    (kube("/api/v1/namespaces/shop/pods"), [asked("notes", {"text": "get pods -n shop"})], "none"),  # not kubectl's
    (kube("/apis"), [], "n/a"), (kube("/api/v1"), [], "n/a"),  # kubectl's discovery
    (kube("/metrics"), [], "none"),
    # MCP by tool and arguments
    (tool_call("search_tickets", {"query": "VPN"}), [asked("tickets_mcp_internal_mcp_search_tickets", {"query": "VPN"})],
     "exact"),
    (tool_call("search_tickets", {"query": "VPN"}), [asked("search_tickets", {"query": "printer"})], "none"),
    (tool_call("delete_ticket", {"query": "VPN"}), [asked("search_tickets", {"query": "VPN"})], "none"),
])
def test_a_request_matches_the_tool_call_that_asked_for_it_in_its_protocols_normal_form(command, calls, match):
    assert judge(command, calls) == match


def test_the_newest_exact_match_wins_over_an_older_or_normalised_one():
    calls = [asked("sql", {"query": "select 1"}, n=3), asked("sql", {"query": "SELECT 1"}, n=2),
             asked("sql", {"query": "SELECT 1"}, n=1)]  # newest first, as the ledger gives them
    op, request = sql("SELECT 1")
    found, how = provenance.match(forms.command(op, request, ""), calls, lambda a: forms.asked_forms(a, ""))
    assert (found.call, how) == ("call_2", "exact")


@pytest.mark.parametrize("calls, match, derived", [
    ([], None, 0),  # nothing asked: no statement is deparsed
    ([asked("sql", {"query": "SELECT 1"})], "exact", 0),
    ([asked("sql", {"query": "select  1"}, n=2), asked("sql", {"query": "select 1"}, n=1)], "normalised", 1),
    ([asked("sql", {"query": "SELECT 2"})], None, 1),
])
def test_a_commands_normal_form_is_derived_once_and_only_when_no_exact_form_matched(calls, match, derived):
    op, request = sql("SELECT 1")
    command = forms.command(op, request, "")
    parsed = []
    command = [dataclasses.replace(f, derive=lambda d=f.derive: parsed.append(1) or d()) for f in command]
    found = provenance.match(command, calls, lambda a: forms.asked_forms(a, ""))
    assert (found and found[1], len(parsed)) == (match, derived)


def test_model_calls_and_the_gateways_own_api_are_not_commands():
    op = llm.from_request("models", Request("POST", "/v1/chat/completions", (), json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()))
    assert forms.command(op, Request("POST", "/v1/chat/completions"), "models.test") is None


# what the ledger remembers


def test_the_ledger_keeps_tool_calls_per_principal_and_run_newest_first_until_they_expire():
    ledger = Ledger(per_key=2)
    ledger.remember(key_of(AGENT), [asked("a", {}, 1, expires=50), asked("b", {}, 2), asked("c", {}, 3)])
    assert [a.tool for a in ledger.recent(key_of(AGENT), now=10)] == ["c", "b"]  # the oldest beyond two went
    other_run = Principal("crew-1", "https://idp", asserted={"run": "run-2"})
    other_issuer = Principal("crew-1", "https://other-idp", asserted={"run": "run-1"})
    assert ledger.recent(key_of(other_run)) == [] and ledger.recent(key_of(other_issuer)) == []
    ledger.remember(key_of(AGENT), [asked("d", {}, 4, expires=20)])
    assert [a.tool for a in ledger.recent(key_of(AGENT), now=30)] == ["c"]  # expired calls are gone
    ledger.forget("ev3")
    assert ledger.recent(key_of(AGENT), now=30) == []


@pytest.mark.parametrize("remembered, now, left", [
    ([("a", 50), ("b", 40), ("c", 60)], 10, ["c", "b", "a"]),
    ([("a", 50), ("b", 40), ("c", 60)], 45, ["c", "a"]),  # a call in the middle expired first
    ([("a", 60), ("b", 20), ("c", 30)], 25, ["c", "a"]),  # connections remember for different times
    ([("a", 60), ("b", 20), ("c", 30)], 30, ["a"]),  # a call expires at its time, not after
    ([("a", 20), ("b", 30)], 99, []),
])
def test_the_ledger_drops_every_expired_call_whatever_its_place(remembered, now, left):
    ledger = Ledger()
    for n, (tool, expires) in enumerate(remembered):
        ledger.remember(key_of(AGENT), [asked(tool, {}, n, expires=expires)])
    assert [a.tool for a in ledger.recent(key_of(AGENT), now=now)] == left
    assert [a.tool for a in ledger.recent(key_of(AGENT), now=now)] == left  # and stay dropped


def test_the_ledger_forgets_the_least_recent_principals_first():
    ledger = Ledger(keys=2)
    for n in range(3):
        ledger.remember(("i", f"s{n}", ""), [asked("t", {}, n)])
    assert [bool(ledger.recent(("i", f"s{n}", ""))) for n in range(3)] == [False, True, True]


@pytest.mark.parametrize("everywhere, reason", [
    (True, "no model output seen by the gateway asked for it (2 tool calls of this principal and run remembered; "
           "none asked for this)"),
    (False, "no model output seen by this gateway replica asked for it (2 tool calls of this principal and run "
            "remembered; none asked for this); other replicas' tool calls are looked up only while a rule asks "
            "about provenance"),
])
def test_a_command_no_model_asked_for_says_whose_tool_calls_were_looked_at(everywhere, reason):
    assert provenance.unverified(Principal("crew-1", "https://idp"), 2, everywhere)["reason"] == reason


def test_provenance_says_what_the_request_asserted_beside_what_the_gateway_saw():
    claiming = Principal("crew-1", "https://idp", asserted={"run": "run-1", "model": "gpt-4o", "prompt": "call_9"})
    none = provenance.unverified(claiming, 0)
    assert none["match"] == "none" and none["asserted"] == {"model": "gpt-4o", "prompt": "call_9"}
    assert "no tool calls of this principal and run remembered" in none["reason"]
    found = provenance.verified(asked("sql", {"query": "x"}, 5), "exact", claiming)
    assert (found["event"], found["tool_call"], found["model"], found["asserted"]["model"]) == (
        "ev5", "call_5", "m", "gpt-4o")


# rules


def ruleset(*rules: dict) -> RuleSet:
    return RuleSet(parse_file({"rules": list(rules)}, "t.yaml"))


def model_call(**body):
    doc = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], **body}
    return llm.from_request("models", Request("POST", "/v1/chat/completions", (), json.dumps(doc).encode()))


def with_provenance(op, match: str | None):
    import dataclasses

    details = {**op.details, **({"provenance": {"match": match}} if match else {})}
    return dataclasses.replace(op, details=details)


LIMITED = {"id": "limited", "match": {"connection": "models", "llm": {"models": "gpt-4o*", "max_tokens": 1000,
                                                                       "tools": ["sql", "search_*"]}},
           "effect": "allow"}


@pytest.mark.parametrize("body, effect, reason", [
    ({"max_tokens": 500}, "allow", "allowed by rule limited"),
    ({"max_tokens": 500, "tools": [{"type": "function", "function": {"name": "search_docs"}}]}, "allow", ""),
    ({"max_tokens": 1000}, "allow", ""),
    ({"max_tokens": 1001}, "deny", "max_tokens 1001 is over the limit of rule limited (1000)"),
    ({}, "deny", "the call does not say max_tokens, and rule limited allows at most 1000"),
    ({"max_tokens": 5, "model": "claude-x"}, "deny", "model 'claude-x' is not one you may use on models "
                                                     "(rule limited allows gpt-4o*)"),
    ({"max_tokens": 5, "tools": [{"type": "function", "function": {"name": "shell"}}]}, "deny",
     "no rule matches this request"),  # a tool the rule does not offer
])
def test_model_rules_limit_models_tokens_and_tools_and_say_which(body, effect, reason):
    decision = ruleset(LIMITED).decide(AGENT, model_call(**body))
    assert decision.effect == effect and reason in decision.reason
    if effect == "deny":
        assert decision.error == "no_matching_rule"


def test_a_deny_rule_on_max_tokens_holds_for_calls_over_it_or_that_do_not_say():
    rules = ruleset({"id": "any", "match": {"connection": "models"}, "effect": "allow"},
                    {"id": "huge", "match": {"llm": {"max_tokens": 4000}}, "effect": "deny"})
    assert [rules.decide(AGENT, model_call(**b)).effect for b in ({"max_tokens": 4000}, {"max_tokens": 4001}, {})] == [
        "allow", "deny", "deny"]


@pytest.mark.parametrize("wanted, effect, outcomes", [
    # provenance of the request: exact, normalised, none, n/a, unknown (the addon did not say)
    ("required", "allow", [True, True, False, True, False]),
    ("exact", "allow", [True, False, False, True, False]),
    ("none", "allow", [False, False, True, False, False]),
    ("required", "deny", [True, True, False, True, True]),  # unknown counts against the agent
    ("none", "review", [False, False, True, False, True]),
])
def test_provenance_conditions_and_what_unknown_provenance_counts_as(wanted, effect, outcomes):
    rule = parse_file({"rules": [{"id": "p", "match": {"provenance": wanted}, "effect": effect,
                                  **({"review": {"approvers": ["group:x"]}} if effect == "review" else {})}]},
                      "t.yaml")[0]
    op, _ = get("/items")
    assert [rule.matches(AGENT, with_provenance(op, m)) for m in ("exact", "normalised", "none", "n/a", None)] == outcomes


@pytest.mark.parametrize("match, message", [
    ({"provenance": "maybe"}, "match.provenance: 'maybe' is not one of ['required', 'exact', 'none']"),
    ({"llm": {"max_tokens": 0}}, "match.llm.max_tokens: 0 is less than the minimum of 1"),
    ({"llm": {"endpoints": "chats"}}, "match.llm.endpoints: "),
    ({"llm": {"model": "x"}}, "match.llm: unknown field ('model' was unexpected)"),
    ({"protocol": "llms"}, "match.protocol: "),
])
def test_model_and_provenance_rules_are_validated_field_by_field(match, message):
    with pytest.raises(RuleError, match="t.yaml: rule 'r': " + message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        parse_file({"rules": [{"id": "r", "match": match, "effect": "allow"}]}, "t.yaml")


# the same answer from the store, for requests that reach another replica than their model call


def remembered_in_both(tmp_path, completions, per_key):
    """A ledger and a SQLite store each given the same completions (lists of calls, in order,
    for one principal and run), the store in the transaction of each completion's event."""
    from addons.engine.store import Event, Store, ToolCall

    ledger, store = Ledger(per_key=per_key), Store(str(tmp_path / "audit.db"))
    for calls in completions:
        ledger.remember(key_of(AGENT), calls)
        store.commit([([Event(id=calls[0].event, kind="completion")], None)],
                     [ToolCall(key_of(AGENT), n, a) for n, a in enumerate(calls)])
    return ledger, store


def completion(n: int, *calls: tuple[str, dict, float], at: float | None = None) -> list[Asked]:
    """Completion `n`'s tool calls (tool, arguments, expiry), asked at time `at` (default n)."""
    return [Asked(event=f"ev{n}", flow=f"f{n}", connection="models", model="m", call=f"call_{n}_{i}", tool=tool,
                  arguments=arguments, text=json.dumps(arguments), form="function", at=n if at is None else at,
                  expires=expires) for i, (tool, arguments, expires) in enumerate(calls)]


SELECT_1 = {"query": "SELECT 1"}


@pytest.mark.parametrize("completions, per_key, now, command, match, call", [
    ([completion(1, ("sql", SELECT_1, 50))], 5, 10, sql("SELECT 1"), "exact", "call_1_0"),
    ([completion(1, ("sql", SELECT_1, 50))], 5, 50, sql("SELECT 1"), "none", None),  # expired at its time
    ([completion(1, ("sql", {"query": "select 1"}, 50))], 5, 10, sql("SELECT 1"), "normalised", "call_1_0"),
    # the newest exact wins, whether it is a later completion or a later call of the same one
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("sql", SELECT_1, 50))], 5, 10, sql("SELECT 1"), "exact",
     "call_2_0"),
    ([completion(1, ("sql", SELECT_1, 50), ("sql", SELECT_1, 50))], 5, 10, sql("SELECT 1"), "exact", "call_1_1"),
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("sql", {"query": "select 1"}, 50))], 5, 10,
     sql("SELECT 1"), "exact", "call_1_0"),  # an older exact beats a newer normalised
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("sql", SELECT_1, 20))], 5, 30, sql("SELECT 1"), "exact",
     "call_1_0"),  # connections remember for different times
    # only the per_key newest count, expired or not
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("a", {}, 50), ("b", {}, 50))], 2, 10, sql("SELECT 1"),
     "none", None),
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("a", {}, 5), ("b", {}, 50))], 2, 10, sql("SELECT 1"),
     "none", None),
    ([completion(1, ("sql", SELECT_1, 50)), completion(2, ("a", {}, 50))], 2, 10, sql("SELECT 1"), "exact",
     "call_1_0"),
    ([completion(1, ("api", {"method": "GET", "path": "/items"}, 50))], 5, 10, get("//items/"), "normalised",
     "call_1_0"),
    ([completion(1, ("api", {"method": "GET", "path": "/items"}, 50))], 5, 10, get("/items", "DELETE"), "none", None),
    ([completion(1, ("search_tickets", {"query": "VPN"}, 50))], 5, 10, tool_call("search_tickets", {"query": "VPN"}),
     "exact", "call_1_0"),
    ([], 5, 10, line("uptime"), "none", None),
])
def test_the_store_and_the_ledger_find_the_same_tool_call(tmp_path, completions, per_key, now, command, match, call):
    ledger, store = remembered_in_both(tmp_path, completions, per_key)
    local = ledger.recent(key_of(AGENT), now=now)
    shared = provenance.current(store.tool_calls(key_of(AGENT), per_key), now, per_key)
    assert shared == local
    op, request = command
    found = [provenance.match(forms.command(op, request, "api.test"), calls, lambda a: forms.asked_forms(a, "api.test"))
             for calls in (local, shared)]
    assert found[0] == found[1]
    assert ((found[0][1], found[0][0].call) if found[0] else ("none", None)) == (match, call)


def test_the_store_keeps_each_principal_and_runs_calls_apart(tmp_path):
    from addons.engine.store import Event, Store, ToolCall

    store = Store(str(tmp_path / "audit.db"))
    calls = completion(1, ("sql", SELECT_1, 50))
    store.commit([([Event(id="ev1", kind="completion")], None)], [ToolCall(key_of(AGENT), 0, calls[0])])
    for other in (Principal("crew-1", "https://idp", asserted={"run": "run-2"}),
                  Principal("crew-1", "https://other-idp", asserted={"run": "run-1"}),
                  Principal("crew-2", "https://idp", asserted={"run": "run-1"})):
        assert store.tool_calls(key_of(other), 5) == []
    assert store.tool_calls(key_of(AGENT), 5) == calls


def test_unknown_provenance_refuses_what_a_rule_allows_only_when_asked_for_and_says_why():
    rules = ruleset({"id": "writes-asked-for", "match": {"connection": "api", "action": "write",
                                                         "provenance": "required"}, "effect": "allow"},
                    {"id": "reads", "match": {"connection": "api", "action": "read"}, "effect": "allow"})
    unknown = {"match": "unknown", "reason": "the audit store could not be read (OperationalError: gone)"}
    write, _ = get("/orders", "POST", b"{}")
    read, _ = get("/items")
    refused = rules.decide(AGENT, dataclasses.replace(write, details={**write.details, "provenance": unknown}))
    assert (refused.effect, refused.status, refused.error) == ("deny", 503, "provenance_unknown")
    assert "rule writes-asked-for allows this only when a model asked for it" in refused.reason
    assert "OperationalError: gone" in refused.reason
    none = rules.decide(AGENT, dataclasses.replace(write, details={**write.details, "provenance": {"match": "none"}}))
    assert (none.effect, none.status, none.error) == ("deny", 403, "no_matching_rule")
    allowed = rules.decide(AGENT, dataclasses.replace(read, details={**read.details, "provenance": unknown}))
    assert allowed.effect == "allow"  # a rule that does not ask about provenance does not care
    deleted, _ = get("/orders/1", "DELETE")
    other = rules.decide(AGENT, dataclasses.replace(deleted, details={**deleted.details, "provenance": unknown}))
    assert (other.status, other.error) == (403, "no_matching_rule")  # no rule would allow it anyway


@pytest.mark.parametrize("found, line", [
    ({"match": "unknown", "reason": "the store could not be read"}, "PROVENANCE unknown: the store could not be read"),
    ({"match": "none", "reason": "nothing asked"}, "PROVENANCE none: nothing asked"),
    ({"match": "n/a"}, ""),
])
def test_the_record_tells_unknown_provenance_by_its_reason(found, line):
    from addons.evidence.timeline import provenance_line

    assert provenance_line(found) == line


@pytest.mark.parametrize("rules, asks", [
    ([], False),
    ([{"id": "reads", "match": {"connection": "api", "action": "read"}, "effect": "allow"}], False),
    ([{"id": "reads", "match": {"connection": "api", "action": "read"}, "effect": "allow"},
      {"id": "asked", "match": {"connection": "api", "provenance": "required"}, "effect": "allow"}], True),
    ([{"id": "unasked", "match": {"connection": "api", "provenance": "none"}, "effect": "deny"}], True),
])
def test_the_store_is_read_for_provenance_only_while_a_rule_asks_about_it(rules, asks):
    assert ruleset(*rules).provenance is asks
