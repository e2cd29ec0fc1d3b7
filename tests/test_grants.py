"""Justifications and time-boxed grants, end to end: an agent says why (or is refused where a
rule wants it to), approvers see it and so does the report; an approver answers a hold with
"this principal, this operation's shape, for N minutes", later requests inside it go through
without a hold, each recorded with the grant it used, until the window closes or the grant
is revoked."""

from __future__ import annotations

import json
import subprocess

import pytest

from addons.engine.approval import Approval, Vote
from addons.engine.grants import Grant, issued
from addons.engine.model import Operation, Principal, Review
from tests.support.approvals import Approver, make_gateway, pending_for, send, start, wait_for
from tests.support.approvers import RULES, agents  # noqa: F401  (a fixture)
from tests.support.gateway import BIN


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers):
    gateway = start(make_gateway(tmp_path_factory.mktemp("grants"), servers, rules=RULES))
    yield gateway
    gateway.stop()


@pytest.fixture
def manager(gw, token):
    return Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))


def reached(upstream, marker: str) -> list:
    return [g for g in upstream.received if marker.encode() in g.body]


# justification


@pytest.mark.parametrize("headers, outcome", [
    ({}, "refused"),
    ({"X-Custody-Justification": ""}, "refused"),
    ({"X-Custody-Justification": "customer 88 was charged twice"}, "held"),
])
def test_a_rule_can_require_a_justification(gw, manager, agents, token, upstream, headers, outcome):
    tag = f"justify-{outcome}-{len(headers)}-{len(next(iter(headers.values()), ''))}"
    agent = token(sub="crew-buyer", groups=["buyers"])
    if outcome == "refused":
        answer = send(gw, agent, "/refund-requests", {"tag": tag}, **headers)
        assert (answer.status_code, answer.json()["error"]) == (403, "justification_required")
        assert answer.json()["rules"] == ["justified-refunds"]
        assert "X-Custody-Justification" in answer.json()["reason"] and "custody.justify" in answer.json()["reason"]
        assert not any(tag in a["request"]["body"] for a in manager.list(state=""))  # no approval was opened
        assert reached(upstream, tag) == []
        return
    held = agents.submit(send, gw, agent, "/refund-requests", {"tag": tag}, **headers)
    approval = pending_for(manager, tag)
    assert approval["justification"] == "customer 88 was charged twice"
    assert manager.vote(approval["id"], "approve", "refund it").json()["state"] == "approved"
    assert held.result(timeout=10).status_code == 200
    report = subprocess.run([str(BIN / "custody"), "audit", "report", "--db", str(gw.db), "--from", "2000-01-01",
                             "-o", str(gw.dir / "report")], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    items = json.loads((gw.dir / "report.json").read_text())["approvals"]["items"]
    assert next(i for i in items if i["id"] == approval["id"])["justification"] == "customer 88 was charged twice"
    assert "customer 88 was charged twice" in (gw.dir / "report.html").read_text()


# grants


def test_a_grant_lets_the_same_shape_through_without_a_hold_until_revoked(gw, manager, agents, token, upstream):
    agent = token(sub="crew-buyer", groups=["buyers"])
    held = agents.submit(send, gw, agent, "/stock/7", {"tag": "grant-first"})
    approval = pending_for(manager, "grant-first")
    voted = manager.vote(approval["id"], "approve", "restock freely", grant="10m")
    assert voted.status_code == 200 and held.result(timeout=10).status_code == 200
    grant = wait_for(lambda: next((g for g in manager.session.get(f"{gw.approvals_url}/grants").json()["grants"]
                                   if g["approval"] == approval["id"]), None))
    assert grant["shape"] == {"connection": "api", "action": "write", "resource": "/stock/7"}
    assert grant["state"] == "active" and grant["granted_by"] == ["manager-1"]
    inside = send(gw, token(sub="crew-buyer", groups=["buyers"]), "/stock/7", {"tag": "grant-inside"})
    assert inside.status_code == 200 and len(reached(upstream, "grant-inside")) == 1
    decision = json.loads(gw.wait_events("kind = 'decision' AND body_digest IS NULL AND approval = ? "
                                         "AND json_extract(detail, '$.decision.grant') IS NOT NULL",
                                         [approval["id"]])[-1]["detail"])["decision"]
    assert decision["grant"] == grant["id"] and decision["effect"] == "allow"
    revoked = manager.session.post(f"{gw.approvals_url}/grants/{grant['id']}/revoke", json={"reason": "enough"})
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    again = agents.submit(send, gw, agent, "/stock/7", {"tag": "grant-after-revoke"})
    pending = pending_for(manager, "grant-after-revoke")  # held again
    assert reached(upstream, "grant-after-revoke") == []
    twice = manager.session.post(f"{gw.approvals_url}/grants/{grant['id']}/revoke", json={})
    assert (twice.status_code, twice.json()["error"]) == (409, "grant_ended")
    steps = [e["detail"].get("step") for e in manager.show(approval["id"])["timeline"] if e["kind"] == "approval"]
    assert "approved" in steps and "grant_revoked" in steps
    manager.vote(pending["id"], "deny", "cleanup")
    assert again.result(timeout=10).status_code == 403


@pytest.mark.parametrize("granted, path, who", [
    ("/stock/20", "/stock/21", "crew-buyer"),  # another resource: outside the shape
    ("/stock/30", "/stock/30", "crew-other"),  # another principal
])
def test_requests_outside_a_grant_are_held(gw, manager, agents, token, upstream, granted, path, who):
    first = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), granted, {"tag": f"shape-{who}{path}"})
    approval = pending_for(manager, f"shape-{who}{path}")
    manager.vote(approval["id"], "approve", "ok", grant="5m")
    assert first.result(timeout=10).status_code == 200
    outside = agents.submit(send, gw, token(sub=who, groups=["buyers"]), path, {"tag": f"outside-{who}{path}"})
    held = pending_for(manager, f"outside-{who}{path}")
    assert held["rules"] == ["grantable-stock"] and reached(upstream, f"outside-{who}{path}") == []
    manager.vote(held["id"], "deny", "cleanup")
    assert outside.result(timeout=10).status_code == 403


def test_a_grant_ends_with_its_window(gw, manager, agents, token, upstream):
    agent = token(sub="crew-buyer", groups=["buyers"])
    first = agents.submit(send, gw, agent, "/brief/1", {"tag": "brief-first"})
    manager.vote(pending_for(manager, "brief-first")["id"], "approve", "just now", grant="2s")
    assert first.result(timeout=10).status_code == 200
    wait_for(lambda: all(g["state"] != "active" for g in manager.session.get(f"{gw.approvals_url}/grants").json()["grants"]
                         if g["shape"]["resource"] == "/brief/1"), timeout=10)
    late = agents.submit(send, gw, agent, "/brief/1", {"tag": "brief-late"})
    held = pending_for(manager, "brief-late")
    assert reached(upstream, "brief-late") == []
    manager.vote(held["id"], "deny", "cleanup")
    assert late.result(timeout=10).status_code == 403


@pytest.mark.parametrize("path, grant, error, reason", [
    ("/stock/9", "1h", "grant_not_allowed", "allow grants of at most 900s"),
    ("/restock", "5m", "grant_not_allowed", "allow no grants"),
    ("/stock/9", "soon", "bad_request", "grant must be a duration"),
])
def test_a_grant_is_bounded_by_the_rules(gw, manager, agents, token, path, grant, error, reason):
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), path, {"tag": f"bound-{path}{grant}"})
    approval = pending_for(manager, f"bound-{path}{grant}")
    refused = manager.vote(approval["id"], "approve", "", grant=grant)
    assert (refused.status_code, refused.json()["error"]) == (400, error)
    assert reason in refused.json()["reason"]
    assert manager.show(approval["id"])["votes"] == []
    manager.vote(approval["id"], "deny", "cleanup")
    held.result(timeout=10)


# the rules of a grant, in-process

PRINCIPAL = Principal("crew-buyer", "idp")
OPERATION = Operation("http", "api", "write", "/stock/7", 40, "POST /stock/7 on api")
REVIEW = Review(("group:managers",), grant_max=900)


def approval_with(*grants: float) -> Approval:
    votes = [Vote(f"m{n}", "idp", ["managers"], "approve", "", 0.0, grant=g) for n, g in enumerate(grants)]
    return Approval("a1", "approved", 0.0, PRINCIPAL, OPERATION, {}, "fp", ["grantable-stock"], "", [REVIEW], 0, 0,
                    votes=votes)


@pytest.mark.parametrize("grants, lasts", [((600,), 600), ((600, 300), 300), ((600, 0), None), ((), None)])
def test_a_grant_needs_every_approving_vote_and_lasts_the_shortest(grants, lasts):
    grant = issued(approval_with(*grants), now=1000.0)
    assert (grant.expires - 1000.0 if grant else None) == lasts


@pytest.mark.parametrize("principal, operation, rules, now, covered", [
    (PRINCIPAL, OPERATION, ("grantable-stock",), 1100.0, True),
    (PRINCIPAL, OPERATION, ("grantable-stock",), 1700.0, False),  # after its window
    (Principal("crew-buyer", "other-idp"), OPERATION, ("grantable-stock",), 1100.0, False),
    (PRINCIPAL, Operation("http", "api", "delete", "/stock/7", 60, "DELETE"), ("grantable-stock",), 1100.0, False),
    (PRINCIPAL, OPERATION, ("grantable-stock", "another-review"), 1100.0, False),  # held by a rule it does not answer
    (PRINCIPAL, OPERATION, (), 1100.0, False),
])
def test_what_a_grant_covers(principal, operation, rules, now, covered):
    grant = issued(approval_with(600), now=1000.0)
    assert grant.covers(principal, operation, rules, now) is covered
    assert Grant.from_document(grant.document()).covers(principal, operation, rules, now) is covered
