"""Rules as a specification: validation errors, matching, and how decisions combine."""

from __future__ import annotations

import json

import pytest
import yaml

from addons.classifiers import http as httpops
from addons.classifiers import kubernetes as kubeops
from addons.engine.model import Principal
from addons.engine.rules import RuleError, RuleSet, glob_regex, parse_file

ANALYST = Principal("crew-analyst", "https://idp", ("analysts",), agent={"model": "gpt-4o"}, asserted={"task": "report"})


def ruleset(*rules: dict) -> RuleSet:
    return RuleSet(parse_file({"rules": list(rules)}, "t.yaml"))


def op(method="GET", path="/items", connection="api", body=None):
    content = None if body is None else (body if isinstance(body, bytes) else __import__("json").dumps(body).encode())
    return httpops.classify(connection, method, path, {"content-type": "application/json"}, content)


# validation: every error names the file, the rule and the field


@pytest.mark.parametrize(
    "document, message",
    [
        ({"rules": [{"id": "a", "match": {"action": "fetch"}, "effect": "allow"}]},
         "t.yaml: rule 'a': match.action: 'fetch' is not one of"),
        ({"rules": [{"id": "a", "match": {}, "effect": "permit"}]},
         "t.yaml: rule 'a': effect: 'permit' is not one of ['allow', 'deny', 'review']"),
        ({"rules": [{"match": {}, "effect": "allow"}]},
         "t.yaml: rule #1: (rule): 'id' is a required property"),
        ({"rules": [{"id": "a", "match": {"pathh": "/x"}, "effect": "allow"}]},
         "t.yaml: rule 'a': match: unknown field ('pathh' was unexpected)"),
        ({"rules": [{"id": "a", "match": {"path": "x"}, "effect": "allow"}]},
         "t.yaml: rule 'a': match.path: 'x' does not match '^/'"),
        ({"rules": [{"id": "r", "match": {}, "effect": "review"}]},
         "t.yaml: rule 'r': (rule): 'review' is a required property"),
        ({"rules": [{"id": "r", "match": {}, "effect": "allow", "review": {"approvers": ["group:x"]}}]},
         "t.yaml: rule 'r': (rule): "),
        ({"rules": [{"id": "r", "match": {}, "effect": "review", "review": {"approvers": ["bob"]}}]},
         "t.yaml: rule 'r': review.approvers[0]: 'bob' does not match"),
        ({"rules": [{"id": "b", "match": {"body": [{"path": "$.a", "op": "gt", "value": "ten"}]}, "effect": "deny"}]},
         "t.yaml: rule 'b': match.body[0].value: 'ten' is not of type 'number'"),
        ({"rules": [{"id": "b", "match": {"body": [{"path": "$.a", "op": "exists", "value": 1}]}, "effect": "deny"}]},
         "t.yaml: rule 'b': match.body[0]: "),
        ({"rules": [{"id": "b", "match": {"body": [{"path": "$[[", "op": "exists"}]}, "effect": "deny"}]},
         "t.yaml: rule 'b': match.body[0].path: not a JSONPath"),
        ({"rules": [{"id": "b", "match": {"body": [{"path": "$.a", "op": "matches", "value": "("}]}, "effect": "deny"}]},
         "t.yaml: rule 'b': match.body[0].value: not a regular expression"),
        ({"rules": [{"id": "a", "match": {"risk": {"min": 500}}, "effect": "allow"}]},
         "t.yaml: rule 'a': match.risk.min: 500 is greater than the maximum of 100"),
        ({"rules": [{"id": "m", "match": {}, "effect": "allow", "masks": ["everything"]}]},
         "t.yaml: rule 'm': masks[0]: "),
        ({"rules": [{"id": "m", "match": {}, "effect": "allow", "masks": [{"detect": ["EMAIL"]}]}]},
         "t.yaml: rule 'm': masks[0]: unknown entity 'EMAIL'"),
        ({"rules": [{"id": "m", "match": {}, "effect": "allow", "masks": [{"fields": "$[["}]}]},
         "t.yaml: rule 'm': masks[0]: not a JSONPath"),
        ({"rules": [{"id": "m", "match": {}, "effect": "allow", "masks": [{"fields": "$.a", "operator": "shred"}]}]},
         "t.yaml: rule 'm': masks[0]"),
        ({"rules": [{"id": "g", "match": {}, "effect": "review",
                     "review": {"approvers": ["group:managers"], "grants": {"max": "soon"}}}]},
         "t.yaml: rule 'g': review.grants.max: "),
        ({"rules": [{"id": "g", "match": {}, "effect": "review",
                     "review": {"approvers": ["group:managers"], "require_justification": "yes"}}]},
         "t.yaml: rule 'g': review.require_justification: 'yes' is not of type 'boolean'"),
        ({"rule": []}, "t.yaml: (top level): unknown field"),
        ("just text", "t.yaml: (top level): 'just text' is not of type 'object'"),
    ],
)
def test_validation_errors(document, message):
    with pytest.raises(RuleError) as e:
        parse_file(document, "t.yaml")
    assert message in str(e.value)


def test_every_error_is_reported_and_ids_are_unique_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "x", "match": {}, "effect": "allow"},
    ]}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "x", "match": {}, "effect": "deny"},
        {"id": "y", "match": {"action": "nope"}, "effect": "allow"},
    ]}))
    (tmp_path / "c.yaml").write_text("rules: [unclosed")
    with pytest.raises(RuleError) as e:
        RuleSet.load([str(tmp_path)])
    lines = str(e.value).splitlines()
    assert f"{tmp_path}/b.yaml: rule 'y': match.action: 'nope' is not one of" in lines[0]
    assert any(f"{tmp_path}/c.yaml: not valid YAML" in line for line in lines)
    assert not any("rule 'x': id" in line for line in lines)  # b.yaml failed validation as a whole


def test_duplicate_ids(tmp_path):
    for name, effect in (("a.yaml", "allow"), ("b.yaml", "deny")):
        (tmp_path / name).write_text(yaml.safe_dump({"rules": [{"id": "x", "match": {}, "effect": effect}]}))
    with pytest.raises(RuleError, match=f"{tmp_path}/b.yaml: rule 'x': id: already used in {tmp_path}/a.yaml"):
        RuleSet.load([str(tmp_path)])


def test_missing_rule_path():
    with pytest.raises(RuleError, match="/nope: no such rule file or directory"):
        RuleSet.load(["/nope"])


# matching


@pytest.mark.parametrize(
    "pattern, path, matches",
    [
        ("/items", "/items", True),
        ("/items", "/items/1", False),
        ("/items/*", "/items/1", True),
        ("/items/*", "/items/1/parts", False),
        ("/items/**", "/items/1/parts", True),
        ("/items/**", "/items", True),
        ("/items/**", "/itemsx", False),
        ("/**/secrets", "/a/b/secrets", True),
        ("/v?/x", "/v1/x", True),
        ("/items/", "/items", True),
        ("/a.b", "/aXb", False),
    ],
)
def test_path_globs(pattern, path, matches):
    assert bool(glob_regex(pattern).match(path)) is matches


@pytest.mark.parametrize(
    "match, operation, principal, holds",
    [
        ({"connection": "api"}, op(), ANALYST, True),
        ({"connection": "other"}, op(), ANALYST, False),
        ({"connection": "a*"}, op(), ANALYST, True),
        ({"connection": ["x", "api"]}, op(), ANALYST, True),
        ({"protocol": "http"}, op(), ANALYST, True),
        ({"protocol": "postgres"}, op(), ANALYST, False),
        ({"action": "read"}, op(), ANALYST, True),
        ({"action": ["write", "delete"]}, op(), ANALYST, False),
        ({"method": "get"}, op(), ANALYST, True),
        ({"method": ["POST"]}, op(), ANALYST, False),
        ({"path": "/items/**"}, op(path="/items/3"), ANALYST, True),
        ({"risk": {"min": 30}}, op(), ANALYST, False),
        ({"risk": {"min": 30}}, op("DELETE"), ANALYST, True),
        ({"risk": {"max": 30}}, op(), ANALYST, True),
        ({"principal": {"groups": ["analysts", "x"]}}, op(), ANALYST, True),
        ({"principal": {"groups": "writers"}}, op(), ANALYST, False),
        ({"principal": {"subjects": "crew-*"}}, op(), ANALYST, True),
        ({"principal": {"subjects": ["bob"]}}, op(), ANALYST, False),
        ({"principal": {"issuers": "https://idp"}}, op(), ANALYST, True),
        ({"agent": {"model": "gpt-*"}}, op(), ANALYST, True),
        ({"agent": {"task": "report"}}, op(), ANALYST, False),  # asserted, not verified
        ({"asserted": {"task": "rep*"}}, op(), ANALYST, True),
        ({"asserted": {"model": "gpt-4o"}}, op(), ANALYST, False),
        ({"connection": "api", "action": "read", "path": "/items"}, op(), ANALYST, True),
        ({"connection": "api", "action": "write"}, op(), ANALYST, False),
    ],
)
def test_match_fields(match, operation, principal, holds):
    rules = ruleset({"id": "r", "match": match, "effect": "allow"})
    assert (rules.decide(principal, operation).effect == "allow") is holds


@pytest.mark.parametrize(
    "condition, body, holds",
    [
        ({"path": "$.amount", "op": "gt", "value": 100}, {"amount": 500}, True),
        ({"path": "$.amount", "op": "gt", "value": 100}, {"amount": 50}, False),
        ({"path": "$.amount", "op": "gt", "value": 100}, {"amount": "500"}, True),  # servers read "500" as 500
        ({"path": "$.amount", "op": "gt", "value": 100}, {"amount": [500]}, False),  # unknown: no allow
        ({"path": "$.amount", "op": "gte", "value": 100}, {"amount": 100}, True),
        ({"path": "$.amount", "op": "lt", "value": 100}, {"amount": 99.5}, True),
        ({"path": "$.amount", "op": "lte", "value": 100}, {"amount": True}, False),
        ({"path": "$.kind", "op": "equals", "value": "refund"}, {"kind": "refund"}, True),
        ({"path": "$.n", "op": "equals", "value": 1}, {"n": True}, False),
        ({"path": "$.kind", "op": "in", "value": ["a", "b"]}, {"kind": "b"}, True),
        ({"path": "$.email", "op": "matches", "value": "@corp\\.example$"}, {"email": "a@corp.example"}, True),
        ({"path": "$.items[*].qty", "op": "gt", "value": 10}, {"items": [{"qty": 1}, {"qty": 50}]}, True),
        ({"path": "$..password", "op": "exists"}, {"user": {"password": "x"}}, True),
        ({"path": "$.dry_run", "op": "absent"}, {"dry_run": True}, False),
        ({"path": "$.dry_run", "op": "absent"}, {}, True),
        ({"path": "$.amount", "op": "gt", "value": 100}, None, False),
    ],
)
def test_body_conditions(condition, body, holds):
    rules = ruleset({"id": "r", "match": {"body": [condition]}, "effect": "allow"})
    assert (rules.decide(ANALYST, op("POST", body=body)).effect == "allow") is holds


@pytest.mark.parametrize(
    "quantity, read_as",
    [("500", 500), (" 5e2 ", 500), ("50", 50), ([500], None), ({"n": 500}, None), ("lots", None), (True, None), (None, None)],
)
@pytest.mark.parametrize("effect", ["deny", "review", "allow"])
def test_a_value_of_another_type_does_not_dodge_a_condition(quantity, read_as, effect):
    """quantity > 100: numeric strings compare as numbers; other types count against the agent."""
    extra = {"review": {"approvers": ["group:x"]}} if effect == "review" else {}
    rules = ruleset({"id": "r", "match": {"body": [{"path": "$.quantity", "op": "gt", "value": 100}]}, "effect": effect, **extra})
    matched = rules.decide(ANALYST, op("POST", body={"quantity": quantity})).rules == ("r",)
    assert matched is (read_as > 100 if read_as is not None else effect != "allow")


@pytest.mark.parametrize(
    "condition, value, holds_for_deny",
    [
        ({"op": "equals", "value": "admin"}, "admin", True),
        ({"op": "equals", "value": "admin"}, "user", False),
        ({"op": "equals", "value": "admin"}, ["admin"], True),
        ({"op": "in", "value": ["a", "b"]}, {"x": 1}, True),
        ({"op": "matches", "value": "^prod"}, 42, True),
        ({"op": "matches", "value": "^prod"}, "staging", False),
    ],
)
def test_type_mismatch_counts_against_the_agent(condition, value, holds_for_deny):
    rules = ruleset({"id": "r", "match": {"body": [{"path": "$.v", **condition}]}, "effect": "deny"})
    assert (rules.decide(ANALYST, op("POST", body={"v": value})).rules == ("r",)) is holds_for_deny


@pytest.mark.parametrize("content", [b'{"amount": 5', b'{"amount": 1, "amount": 5000}'])
@pytest.mark.parametrize("effect, holds", [("deny", True), ("review", True), ("allow", False)])
def test_unreadable_bodies_count_against_the_agent(content, effect, holds):
    extra = {"review": {"approvers": ["group:x"]}} if effect == "review" else {}
    rules = ruleset({"id": "r", "match": {"body": [{"path": "$.amount", "op": "gt", "value": 100}]}, "effect": effect, **extra})
    got = rules.decide(ANALYST, op("POST", body=content)).effect
    assert (got == effect) is holds


# combining


EMAIL = {"fields": "$..email"}
ALLOW = {"id": "allow-all", "match": {}, "effect": "allow", "masks": [EMAIL]}
ALLOW2 = {"id": "allow-reads", "match": {"action": "read"}, "effect": "allow", "masks": [EMAIL, "secrets"]}
REVIEW = {"id": "review-reads", "match": {"action": "read"}, "effect": "review", "reason": "check it",
          "review": {"approvers": ["group:leads"], "approvals": 2, "timeout": "10m"}}
DENY = {"id": "deny-reads", "match": {"action": "read"}, "effect": "deny", "reason": "no reads today"}


@pytest.mark.parametrize(
    "rules, effect, ids, reason, masks",
    [
        ([], "deny", [], "no rule matches this request", []),
        ([ALLOW], "allow", ["allow-all"], "allowed by rule allow-all", [EMAIL]),
        ([ALLOW, ALLOW2], "allow", ["allow-all", "allow-reads"], "allowed by rule allow-all", [EMAIL, "secrets"]),
        ([ALLOW, REVIEW], "review", ["review-reads"], "check it", [EMAIL]),
        ([ALLOW, REVIEW, DENY], "deny", ["deny-reads"], "no reads today", []),
        ([DENY, ALLOW], "deny", ["deny-reads"], "no reads today", []),
    ],
)
def test_deny_beats_review_beats_allow_and_masks_are_the_union(rules, effect, ids, reason, masks):
    decision = ruleset(*rules).decide(ANALYST, op())
    assert decision.effect == effect
    assert list(decision.rules) == ids
    assert decision.reason == reason
    assert list(decision.masks) == masks


def test_review_carries_approvers_quorum_and_timeouts():
    decision = ruleset(REVIEW).decide(ANALYST, op())
    (review,) = decision.reviews
    assert review.approvers == ("group:leads",) and review.approvals == 2
    assert review.timeout == 600 and review.ttl == 3600 and review.denials == 1


def test_index_keeps_wildcard_and_action_free_rules():
    rules = ruleset(
        {"id": "exact", "match": {"connection": "api", "action": "read"}, "effect": "allow"},
        {"id": "glob", "match": {"connection": "a*"}, "effect": "allow"},
        {"id": "any", "match": {}, "effect": "allow"},
        {"id": "other", "match": {"connection": "db"}, "effect": "allow"},
    )
    assert [r.id for r in rules.candidates("api", "read")] == ["exact", "glob", "any"]
    assert [r.id for r in rules.candidates("api", "write")] == ["glob", "any"]
    assert list(rules.decide(ANALYST, op()).rules) == ["exact", "glob", "any"]


def test_first_failure_explains_a_miss():
    (rule,) = ruleset({"id": "r", "match": {"connection": "api", "action": "write", "path": "/x"}, "effect": "allow"}).rules
    assert rule.first_failure(ANALYST, op()) == "action"
    assert rule.first_failure(ANALYST, op("POST", "/x")) is None


def kube(method="GET", target="/api/v1/namespaces/default/pods", **headers):
    return kubeops.classify("k8s", method, target, {k.replace("_", "-"): [v] for k, v in headers.items()}, None)


@pytest.mark.parametrize(
    "match, operation, holds",
    [
        ({"verbs": "list"}, kube(), True),
        ({"verbs": ["get", "watch"]}, kube(), False),
        ({"verbs": "watch"}, kube(target="/api/v1/namespaces/default/pods?watch=1"), True),
        ({"resources": "pods"}, kube(), True),
        ({"resources": "pods"}, kube("POST", "/api/v1/namespaces/default/pods/web/exec"), False),
        ({"resources": "pods/*"}, kube("POST", "/api/v1/namespaces/default/pods/web/exec"), True),
        ({"resources": "secrets"}, kube(target="/version"), False),
        ({"groups": "apps"}, kube(target="/apis/apps/v1/namespaces/default/deployments"), True),
        ({"groups": ""}, kube(), True),
        ({"namespaces": "team-*"}, kube(target="/api/v1/namespaces/team-a/pods"), True),
        ({"namespaces": "team-*"}, kube(), False),
        ({"names": "web-*"}, kube(target="/api/v1/namespaces/default/pods/web-1"), True),
        ({"names": "web-1"}, kube(target="/api/v1/namespaces/default/pods?fieldSelector=metadata.name%3Dweb-1"), True),
        ({"commands": "cat /etc/*"}, kube("POST", "/api/v1/namespaces/d/pods/p/exec?command=cat&command=/etc/shadow"), True),
        ({"commands": "ls"}, kube("POST", "/api/v1/namespaces/d/pods/p/exec?command=ls&command=-la"), False),
        ({"non_resource": True}, kube(target="/healthz"), True),
        ({"non_resource": True}, kube(), False),
        ({"non_resource": False}, kube(), True),
        ({"dry_run": True}, kube("POST", "/api/v1/namespaces/default/pods?dryRun=All"), True),
        ({"dry_run": False}, kube("POST", "/api/v1/namespaces/default/pods?dryRun=All"), False),
        ({"verbs": "list"}, kube(impersonate_user="admin"), False),  # an allow rule never impersonates by accident
        ({"impersonate": {"users": "viewer"}}, kube(impersonate_user="viewer"), True),
        ({"impersonate": {"users": "viewer"}}, kube(impersonate_user="admin"), False),
        ({"impersonate": {"users": "viewer"}}, kube(), False),
        ({"impersonate": {"groups": "devs"}}, kube(impersonate_user="x", impersonate_group="system:masters"), False),
        ({"verbs": "get"}, op(), False),  # Kubernetes conditions never hold for other protocols
    ],
)
def test_kubernetes_match_fields(match, operation, holds):
    rules = ruleset({"id": "r", "match": {"kubernetes": match}, "effect": "allow"})
    assert (rules.decide(ANALYST, operation).effect == "allow") is holds


def test_impersonation_blocks_deny_and_review_too():
    rules = ruleset({"id": "no-admin-impersonation", "match": {"kubernetes": {"impersonate": {"users": "admin"}}},
                     "effect": "deny"},
                    {"id": "anything", "match": {"connection": "k8s"}, "effect": "review",
                     "review": {"approvers": ["group:sre"]}})
    assert rules.decide(ANALYST, kube(impersonate_user="admin")).effect == "deny"
    assert rules.decide(ANALYST, kube(impersonate_user="viewer")).effect == "review"  # deny/review need no opt-in


def test_shipped_rules_are_valid():
    from pathlib import Path

    rules = RuleSet.load([str(Path(__file__).parents[1] / "rules")])
    assert len(rules.rules) >= 5


def sql(text: str, rows: int | None | str = "none"):
    """A classified SQL string; `rows` is the planner's estimate for its writes."""
    from addons.classifiers import postgres as sqlops

    op = sqlops.classify("db", "execute", text)
    if rows == "none":
        return op
    return sqlops.combine("db", "execute", tuple(sqlops.estimated(p, rows) for p in op.parts))


@pytest.mark.parametrize(
    "match, effect, operation, holds",
    [
        ({"classes": "DDL"}, "deny", sql("DROP TABLE users"), True),
        ({"classes": ["DDL", "ROLE"]}, "deny", sql("SET ROLE postgres"), True),
        ({"classes": "DDL"}, "deny", sql("SELECT 'DROP TABLE users'"), False),
        ({"commands": "drop table"}, "deny", sql("DROP TABLE users"), True),
        ({"commands": "DROP *"}, "deny", sql("DROP INDEX i"), True),
        ({"tables": "users"}, "deny", sql("SELECT * FROM public.orders JOIN users USING (id)"), True),
        ({"tables": "public.*"}, "deny", sql("SELECT * FROM public.orders"), True),
        ({"tables": "users"}, "deny", sql("SELECT * FROM orders"), False),
        ({"functions": "pg_sleep"}, "deny", sql("SELECT pg_sleep(10)"), True),
        ({"where": False}, "review", sql("DELETE FROM users"), True),
        ({"where": False}, "review", sql("DELETE FROM users WHERE id = 1"), False),
        ({"where": False}, "review", sql("SELECT 1"), False),  # not a write
        ({"rows": {"min": 101}}, "review", sql("UPDATE t SET a = 1 WHERE b", 5000), True),
        ({"rows": {"min": 101}}, "review", sql("UPDATE t SET a = 1 WHERE b", 3), False),
        ({"rows": {"min": 101}}, "review", sql("UPDATE t SET a = 1 WHERE b", None), True),  # no estimate: against
        ({"rows": {"max": 100}}, "allow", sql("UPDATE t SET a = 1 WHERE b", None), False),
        ({"rows": {"max": 100}}, "allow", sql("UPDATE t SET a = 1 WHERE b", 7), True),
        ({"rows": {"min": 0}}, "review", sql("SELECT 1"), False),  # reads have no estimate
        ({"classes": "DDL"}, "deny", op(), False),  # SQL conditions never hold for other protocols
    ],
)
def test_sql_match_fields(match, effect, operation, holds):
    extra = {"review": {"approvers": ["group:dba"]}} if effect == "review" else {}
    base = [] if effect == "allow" else [{"id": "base", "match": {"connection": ["db", "api"]}, "effect": "allow"}]
    rules = ruleset({"id": "r", "match": {"sql": match}, "effect": effect, **extra}, *base)
    assert (rules.decide(ANALYST, operation).effect == effect) is holds


@pytest.mark.parametrize(
    "text, effect, reason",
    [
        ("SELECT 1; SELECT 2", "allow", "all 2 statements allowed"),
        ("SELECT 1; DROP TABLE users", "deny", "statement 2 (DROP TABLE): no DDL"),
        ("SELECT 1; DELETE FROM users", "review", "statement 2 (DELETE): unfiltered"),
        ("DELETE FROM users; DROP TABLE users", "deny", "statement 2 (DROP TABLE): no DDL"),  # deny beats review
        ("SELECT 1; VACUUM", "deny", "statement 2 (VACUUM): no rule matches this request"),
    ],
)
def test_each_statement_is_decided_and_the_strictest_wins(text, effect, reason):
    rules = ruleset(
        {"id": "reads", "match": {"action": "read"}, "effect": "allow", "masks": ["pii"]},
        {"id": "writes", "match": {"action": ["write", "delete"]}, "effect": "allow"},
        {"id": "no-ddl", "match": {"sql": {"classes": "DDL"}}, "effect": "deny", "reason": "no DDL"},
        {"id": "unfiltered", "match": {"sql": {"where": False}}, "effect": "review", "reason": "unfiltered",
         "review": {"approvers": ["group:dba"]}},
    )
    decision = rules.decide(ANALYST, sql(text))
    assert (decision.effect, decision.reason) == (effect, reason)
    if effect != "deny":
        assert decision.masks == ("pii",)  # the reads' masks apply to the whole string's results


# Kubernetes scope: a request across every namespace, or every object of a collection, reaches all of them

EVERY_NAMESPACE = [
    "/api/v1/pods",
    "/api/v1/pods/",
    "/api/v1/%70ods",
    "/api/v1/pods?watch=1",
    "/api/v1/pods?watch=",
    "/api/v1/pods?watch=true&resourceVersion=0",
    "/api/v1/watch/pods",
    "/api/v1/pods?fieldSelector=metadata.namespace%3Dprod",
    "/api/v1/pods?fieldSelector=metadata.namespace%3D%3Dprod",
    "/api/v1/pods?fieldSelector=metadata.namespace%3Ddev",  # the server filters; the gateway does not count on it
    "/api/v1/pods?fieldSelector=metadata.namespace!%3Ddev",
    "/api/v1/watch/pods?fieldSelector=metadata.namespace%3Dprod",
    "/api/v1/pods?labelSelector=app%3Dweb&limit=1",
    "/api/v1/pods?fieldSelector=metadata.name%3Dweb",  # one name, in every namespace
    "/api/v1/namespaces//pods",  # an empty namespace: every namespace to the API server
    "/api/v1/watch/namespaces//pods",
    "/apis/apps/v1/deployments?watch=1",
    "/apis/apps/v1/watch/deployments",
    "/apis/example.com/v1/widgets",
]
READ_ANYTHING = {"id": "read-anything", "match": {"connection": "k8s", "action": "read"}, "effect": "allow"}
PROD_MASK = {"objects": {"kind": "Pod", "fields": ["spec"]}}


@pytest.mark.parametrize("target", EVERY_NAMESPACE)
def test_a_deny_rule_on_a_namespace_denies_requests_across_every_namespace(target):
    rules = ruleset(READ_ANYTHING, {"id": "prod-off-limits", "match": {"kubernetes": {"namespaces": ["prod", "vault-*"]}},
                                    "effect": "deny", "reason": "prod is off limits"})
    decision = rules.decide(ANALYST, kube(target=target))
    assert (decision.effect, decision.error, decision.status) == ("deny", "denied_by_policy", 403)
    assert decision.rules == ("prod-off-limits",) and decision.reason.endswith("prod is off limits")


@pytest.mark.parametrize("target", EVERY_NAMESPACE)
def test_a_review_rule_on_a_namespace_holds_requests_across_every_namespace(target):
    rules = ruleset(READ_ANYTHING, {"id": "prod-reviewed", "match": {"kubernetes": {"namespaces": "prod"}},
                                    "effect": "review", "review": {"approvers": ["group:sre"]}})
    assert rules.decide(ANALYST, kube(target=target)).effect == "review"


@pytest.mark.parametrize("target", EVERY_NAMESPACE)
@pytest.mark.parametrize("namespaces", [["dev"], "team-*", ["dev", "prod"], "?*", ["", "dev"]])
def test_an_allow_rule_on_some_namespaces_does_not_allow_requests_across_every_namespace(target, namespaces):
    rules = ruleset({"id": "dev-reader", "match": {"action": "read", "kubernetes": {"namespaces": namespaces}},
                     "effect": "allow"})
    decision = rules.decide(ANALYST, kube(target=target))
    assert (decision.effect, decision.error) == ("deny", "no_matching_rule")


@pytest.mark.parametrize("target", EVERY_NAMESPACE)
@pytest.mark.parametrize("namespaces", ["*", ["dev", "*"], "**"])
def test_an_allow_rule_on_every_namespace_allows_them(target, namespaces):
    rules = ruleset({"id": "all", "match": {"action": "read", "kubernetes": {"namespaces": namespaces}}, "effect": "allow"})
    assert rules.decide(ANALYST, kube(target=target)).effect == "allow"


@pytest.mark.parametrize("target", EVERY_NAMESPACE)
def test_masks_of_a_namespace_apply_to_requests_across_every_namespace(target):
    rules = ruleset(READ_ANYTHING, {"id": "prod-masked", "match": {"action": "read", "kubernetes": {"namespaces": "prod"}},
                                    "effect": "allow", "masks": [PROD_MASK]})
    decision = rules.decide(ANALYST, kube(target=target))
    assert (decision.effect, decision.rules, decision.masks) == ("allow", ("read-anything",), (PROD_MASK,))


@pytest.mark.parametrize(
    "target, masks",
    [
        ("/api/v1/namespaces/prod/pods", (PROD_MASK,)),
        ("/api/v1/namespaces/prod/pods/web", (PROD_MASK,)),
        ("/api/v1/namespaces/dev/pods", ()),
        ("/api/v1/nodes", ()),  # cluster-scoped: in no namespace
        ("/api/v1/namespaces/prod/pods?fieldSelector=metadata.namespace%3Ddev", (PROD_MASK,)),
    ],
)
def test_masks_of_a_namespace_stay_in_it(target, masks):
    rules = ruleset(READ_ANYTHING, {"id": "prod-masked", "match": {"action": "read", "kubernetes": {"namespaces": "prod"}},
                                    "effect": "allow", "masks": [PROD_MASK]})
    assert rules.decide(ANALYST, kube(target=target)).masks == masks


@pytest.mark.parametrize(
    "target, effect",
    [
        ("/api/v1/namespaces/dev/pods", "allow"),
        ("/api/v1/namespaces/dev/pods/web", "allow"),
        ("/api/v1/namespaces/prod/pods", "deny"),
        ("/api/v1/nodes", "allow"),
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles", "allow"),
        ("/version", "allow"),
    ],
)
def test_requests_in_one_namespace_or_none_are_decided_by_it(target, effect):
    rules = ruleset(READ_ANYTHING, {"id": "prod-off-limits", "match": {"kubernetes": {"namespaces": "prod"}}, "effect": "deny"})
    assert rules.decide(ANALYST, kube(target=target)).effect == effect


def kube_body(method, target, document, content_type="application/json"):
    return kubeops.classify("k8s", method, target, {"content-type": [content_type]}, json.dumps(document).encode())


SECRETS = "/api/v1/namespaces/default/secrets"


@pytest.mark.parametrize(
    "operation, denied",
    [
        (kube(target=SECRETS), True),  # a list returns db
        (kube(target=SECRETS + "?watch=1"), True),
        (kube(target="/api/v1/watch/namespaces/default/secrets"), True),
        (kube(target="/api/v1/secrets"), True),
        (kube(target=SECRETS + "?fieldSelector=metadata.name%3Ddb"), True),
        (kube(target=SECRETS + "?fieldSelector=metadata.name%3Ddb,type%3DOpaque"), True),
        (kube(target=SECRETS + "?labelSelector=app%3Ddb"), True),
        (kube("DELETE", SECRETS), True),  # a collection delete takes db with it
        (kube("DELETE", SECRETS + "?fieldSelector=metadata.name%3Dother"), True),  # selectors do not name a delete
        (kube_body("POST", SECRETS, {"metadata": {"name": "db"}}), True),
        (kube_body("POST", SECRETS, {"metadata": {"generateName": "d"}}), True),  # its name is not known
        (kube_body("POST", SECRETS, {"metadata": {"name": "db"}}, "application/yaml"), True),
        (kube(target=SECRETS + "/db"), True),
        (kube(target=SECRETS + "/web"), False),
        (kube(target=SECRETS + "?fieldSelector=metadata.name%3Dweb"), False),
        (kube_body("POST", SECRETS, {"metadata": {"name": "web"}}), False),
        (kube("DELETE", SECRETS + "/web"), False),
    ],
)
def test_a_deny_rule_on_a_name_denies_every_request_that_reaches_it(operation, denied):
    rules = ruleset({"id": "anything", "match": {"connection": "k8s"}, "effect": "allow"},
                    {"id": "not-db", "match": {"kubernetes": {"resources": "secrets", "names": "db"}}, "effect": "deny"})
    assert (rules.decide(ANALYST, operation).effect == "deny") is denied


@pytest.mark.parametrize(
    "operation, allowed",
    [
        (kube(target=SECRETS + "/web-1"), True),
        (kube(target=SECRETS + "?fieldSelector=metadata.name%3Dweb-1"), True),
        (kube_body("POST", SECRETS, {"metadata": {"name": "web-2"}}), True),
        (kube(target=SECRETS), False),
        (kube("DELETE", SECRETS), False),
        (kube_body("POST", SECRETS, {"metadata": {"generateName": "web-"}}), False),
    ],
)
def test_an_allow_rule_on_names_allows_only_what_it_names(operation, allowed):
    rules = ruleset({"id": "web", "match": {"kubernetes": {"names": "web-*"}}, "effect": "allow"})
    assert (rules.decide(ANALYST, operation).effect == "allow") is allowed


def test_both_readings_of_an_ambiguous_path_are_decided():
    rules = ruleset(READ_ANYTHING, {"id": "prod-off-limits", "match": {"kubernetes": {"namespaces": "prod"}},
                                    "effect": "deny", "reason": "prod is off limits"})
    decision = rules.decide(ANALYST, kube(target="/api/v1/namespaces//pods"))
    assert (decision.effect, decision.rules) == ("deny", ("prod-off-limits",))
    assert decision.reason == ("as /api/v1/namespaces//pods may be read (list pods in every namespace on k8s): "
                               "prod is off limits")


@pytest.mark.parametrize(
    "content_type, patch, effect",
    [
        ("application/merge-patch+json", {"spec": {"replicas": 500}}, "deny"),
        ("application/merge-patch+json", {"spec": {"replicas": 2}}, "allow"),
        ("application/strategic-merge-patch+json", {"spec": {"replicas": 2}}, "allow"),
        ("application/json-patch+json", [{"op": "replace", "path": "/spec/replicas", "value": 500}], "deny"),
        ("application/json-patch+json", [{"op": "replace", "path": "/spec/replicas", "value": 2}], "deny"),  # unjudgeable
        ("application/json-patch+json", {"spec": {"replicas": 2}}, "deny"),
        ("application/json", {"spec": {"replicas": 2}}, "deny"),
    ],
)
def test_patch_bodies_are_judged_as_the_server_reads_them(content_type, patch, effect):
    rules = ruleset(
        {"id": "small", "match": {"body": [{"path": "$.spec.replicas", "op": "lte", "value": 10}]}, "effect": "allow"},
        {"id": "huge", "match": {"body": [{"path": "$.spec.replicas", "op": "gt", "value": 100}]}, "effect": "deny"})
    operation = kube_body("PATCH", "/apis/apps/v1/namespaces/default/deployments/web", patch, content_type)
    assert rules.decide(ANALYST, operation).effect == effect


def test_a_review_can_require_a_justification_and_allow_grants():
    rules = parse_file({"rules": [{"id": "r", "match": {}, "effect": "review", "review": {
        "approvers": ["group:managers"], "require_justification": True, "grants": {"max": "30m"}}}]}, "t.yaml")
    review = rules[0].review
    assert (review.require_justification, review.grant_max) == (True, 1800.0)
    plain = parse_file({"rules": [{"id": "p", "match": {}, "effect": "review", "review": {"approvers": ["subject:x"]}}]},
                       "t.yaml")[0].review
    assert (plain.require_justification, plain.grant_max) == (False, 0.0)
