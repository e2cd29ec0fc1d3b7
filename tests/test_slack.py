"""Approving in Slack: a held agent request becomes an interactive message in every channel,
a signed click by a Slack user bound to an SSO identity decides it and the agent resumes,
and every copy is updated in place whoever decided and wherever — while clicks that are not
Slack's, are stale, replayed, by someone unmapped or by the requester decide nothing."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.support.approvals import Approver, pending_for, send, wait_for
from tests.support.approvers import (
    ALICE,
    CAROL,
    CHANNELS,
    SLACK_ALICE,
    SLACK_CAROL,
    SLACK_STRANGER,
    Browserless,
    agents,  # noqa: F401  (a fixture)
    approvers_gateway,
    id_token,
)
from tests.support.gateway import BIN
from tests.support.oidc import Provider
from tests.support.saml import IdentityProvider
from tests.support.slack import SlackStandIn


@pytest.fixture(scope="module")
def idp():
    op = Provider([ALICE, CAROL])
    yield op
    op.stop()


@pytest.fixture(scope="module")
def slack():
    api = SlackStandIn("xoxb-custody-test", "slack-signing-secret-9f2")
    api.users.update({SLACK_ALICE: ALICE.email, SLACK_STRANGER: "stranger@example.com"})
    yield api
    api.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, idp, slack):
    saml = IdentityProvider(tmp_path_factory.mktemp("saml-idp"), [])
    gateway = approvers_gateway(tmp_path_factory.mktemp("slack"), servers, idp, saml, slack)
    for person in (ALICE, CAROL):  # an SSO sign-in binds their e-mail to their IdP identity
        Browserless(gateway).sign_in(person)
    yield gateway
    gateway.stop()
    saml.stop()


def url(gw) -> str:
    return f"{gw.approvals_url}/slack/interactions"


def messages(slack, approval_id: str, count: int = len(CHANNELS)) -> list[tuple[str, str]]:
    return wait_for(lambda: len(found := slack.posted_for(approval_id)) >= count and found)


def buttons(version: dict) -> list[str]:
    return [e["action_id"] for b in version["blocks"] if b["type"] == "actions" for e in b["elements"]]


def settled(slack, where: list[tuple[str, str]], word: str) -> None:
    """Every copy's latest version says `word` and has no button to vote with any more."""
    wait_for(lambda: all(word in json.dumps(slack.messages[k][-1]["blocks"]) and buttons(slack.messages[k][-1]) == ["details"]
                         for k in where))


def reached(upstream, marker: str) -> list:
    return [g for g in upstream.received if marker.encode() in g.body]


def held_request(gw, agents, token, path: str, tag: str, who=None, **headers):
    agent = who or token(sub="crew-buyer", groups=["buyers"])
    future = agents.submit(send, gw, agent, path, {"tag": tag}, **headers)
    approval = pending_for(Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])), tag)
    return future, approval


def test_a_click_in_slack_resumes_the_held_request_and_updates_every_copy(gw, slack, agents, token, upstream):
    held, approval = held_request(gw, agents, token, "/restock", "slack-path",
                                  **{"X-Custody-Model": "gpt-4o", "X-Custody-Agent": "Inventory analyst",
                                     "X-Custody-Justification": "item 7 is out of stock"})
    where = messages(slack, approval["id"])
    assert sorted(c for c, _ in where) == sorted(CHANNELS)
    first = slack.messages[where[0]][0]
    shown = json.dumps(first["blocks"])
    assert "*crew-buyer* (gpt-4o) wants to `POST /restock on api` (risk 40)" in first["text"]
    for fact in ("crew-buyer (buyers)", "agent: Inventory analyst", "model: gpt-4o", "risk", "one-manager",
                 "restocking needs a manager", "item 7 is out of stock", "group:managers", "slack-path"):
        assert fact in shown, fact
    assert buttons(first) == ["approve", "deny", "details"]
    answer = slack.click(url(gw), *where[0], SLACK_ALICE, "approve", reason="stock is low")
    assert answer.status_code == 200 and answer.json() == {"ok": True, "approval": approval["id"], "state": "approved",
                                                           "voter": "alice"}
    assert held.result(timeout=10).status_code == 200 and len(reached(upstream, "slack-path")) == 1
    settled(slack, where, "approved by alice: stock is low")
    done = Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])).show(approval["id"])
    assert [(v["approver"], v["via"], v["reason"]) for v in done["votes"]] == [("alice", "slack", "stock is low")]
    wait_for(lambda: any("Recorded: you approved" in t for t in slack.told(SLACK_ALICE)))


def decide_with_the_api(gw, approval, token):
    Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"])).vote(approval["id"], "deny", "not today")


def decide_on_the_page(gw, approval, token):
    run = Browserless(gw)
    me = run.sign_in(ALICE)
    assert run.vote(approval["id"], "deny", me["csrf"], reason="not today").status_code == 200


def decide_with_the_cli(gw, approval, token):
    env = {**gw.env, "CUSTODY_CONFIG": str(gw.config_file), "CUSTODY_APPROVALS_URL": gw.approvals_url,
           "CUSTODY_APPROVER_TOKEN": token(sub="manager-1", groups=["managers"])}
    subprocess.run([str(BIN / "custody"), "approvals", "deny", approval["id"], "--reason", "not today"], env=env,
                   check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("where_decided", [decide_with_the_api, decide_on_the_page, decide_with_the_cli])
def test_a_decision_made_elsewhere_updates_the_slack_messages(gw, slack, agents, token, where_decided):
    held, approval = held_request(gw, agents, token, "/restock", f"elsewhere-{where_decided.__name__}")
    where = messages(slack, approval["id"])
    where_decided(gw, approval, token)
    assert held.result(timeout=10).status_code == 403
    settled(slack, where, "denied by")


def test_an_approval_nobody_decided_updates_the_slack_messages_when_it_expires(gw, slack, token):
    answer = send(gw, token(sub="crew-buyer", groups=["buyers"]), "/fleeting", {"tag": "fleeting"})
    assert answer.json()["error"] == "approval_pending"
    where = messages(slack, answer.json()["approval_id"])
    settled(slack, where, "expired")


def sign(slack, body, timestamp, secret=None):
    return slack.sign(body, timestamp, secret)


@pytest.mark.parametrize("name, forge, reason", [
    ("bad signature", lambda slack, body: sign(slack, body, int(time.time()), "not-the-signing-secret"),
     "bad signature: not signed with this app's signing secret"),
    ("expired timestamp", lambda slack, body: sign(slack, body, int(time.time()) - 600),
     "the request's timestamp is more than 5 minutes from now"),
    ("no signature", lambda slack, body: {"content-type": "application/x-www-form-urlencoded"},
     "X-Slack-Request-Timestamp and X-Slack-Signature are required"),
])
def test_clicks_that_are_not_slacks_decide_nothing(gw, slack, agents, token, upstream, name, forge, reason):
    held, approval = held_request(gw, agents, token, "/restock", f"forged-{name}")
    where = messages(slack, approval["id"])
    body = slack.payload(*where[0], SLACK_ALICE, "approve")
    answer = slack.send(url(gw), body, forge(slack, body))
    assert (answer.status_code, answer.json()["error"]) == (401, "slack_unverified")
    assert reason in answer.json()["reason"]
    assert Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])).show(approval["id"])["votes"] == []
    assert not held.done() and reached(upstream, f"forged-{name}") == []
    decide_with_the_api(gw, approval, token)
    held.result(timeout=10)


def test_a_replayed_click_counts_once(gw, slack, agents, token):
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/orders", {"tag": "replayed"})
    approval = pending_for(Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])), "replayed")
    where = messages(slack, approval["id"])
    body = slack.payload(*where[0], SLACK_ALICE, "approve")
    headers = slack.sign(body, int(time.time()))
    assert slack.send(url(gw), body, headers).json()["state"] == "pending"  # the rule needs two managers
    again = slack.send(url(gw), body, headers)
    assert (again.status_code, again.json()["error"]) == (401, "slack_unverified")
    assert again.json()["reason"] == "this signed request was seen already (replayed)"
    show = Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])).show(approval["id"])
    assert [v["approver"] for v in show["votes"]] == ["alice"] and not held.done()
    decide_with_the_api(gw, approval, token)
    held.result(timeout=10)


@pytest.mark.parametrize("name, user, action, reason, error, told", [
    ("unmapped user", SLACK_STRANGER, "approve", "", "unmapped_user", "bound to no approver"),
    ("denial without a reason", SLACK_ALICE, "deny", "", "reason_required", "a denial needs a reason"),
])
def test_verified_clicks_that_may_not_vote(gw, slack, agents, token, upstream, name, user, action, reason, error, told):
    held, approval = held_request(gw, agents, token, "/restock", f"refused-{error}")
    where = messages(slack, approval["id"])
    answer = slack.click(url(gw), *where[0], user, action, reason=reason)
    assert answer.status_code == 200 and (answer.json()["ok"], answer.json()["error"]) == (False, error)
    assert Approver(gw.approvals_url, token(sub="manager-0", groups=["managers"])).show(approval["id"])["votes"] == []
    wait_for(lambda: any(told in t for t in slack.told(user)))
    assert not held.done() and reached(upstream, f"refused-{error}") == []
    decide_with_the_api(gw, approval, token)
    held.result(timeout=10)


def test_the_requester_cannot_approve_their_own_request_in_slack(gw, slack, agents, token, idp, upstream):
    held, approval = held_request(gw, agents, token, "/restock", "self-in-slack", who=id_token(idp, CAROL))
    where = messages(slack, approval["id"])
    answer = slack.click(url(gw), *where[0], SLACK_CAROL, "approve")  # carol's Slack account, bound to carol
    assert (answer.json()["ok"], answer.json()["error"]) == (False, "self_approval")
    wait_for(lambda: any("cannot approve or deny their own request" in t for t in slack.told(SLACK_CAROL)))
    assert not held.done() and reached(upstream, "self-in-slack") == []
    decide_with_the_api(gw, approval, token)
    held.result(timeout=10)


def test_a_stale_button_says_what_already_happened(gw, slack, agents, token):
    held, approval = held_request(gw, agents, token, "/restock", "stale")
    where = messages(slack, approval["id"])
    decide_with_the_api(gw, approval, token)
    held.result(timeout=10)
    settled(slack, where, "denied by manager-1")
    updates = len(slack.called("chat.update"))
    answer = slack.click(url(gw), *where[0], SLACK_ALICE, "approve", version=0)  # a client that never refreshed
    assert (answer.json()["ok"], answer.json()["error"]) == (False, "not_pending")
    assert answer.json()["reason"].startswith("This request was already denied (denied by manager-1: not today) at ")
    wait_for(lambda: any(t.startswith("This request was already denied") for t in slack.told(SLACK_ALICE)))
    wait_for(lambda: len(slack.called("chat.update")) > updates)  # and the message it was pressed on is redrawn


def test_approving_for_a_while_from_slack_grants_the_shape(gw, slack, agents, token, upstream):
    held, approval = held_request(gw, agents, token, "/stock/41", "grant-from-slack")
    where = messages(slack, approval["id"])
    assert buttons(slack.messages[where[0]][0]) == ["approve", "deny", "approve_grant", "details"]
    answer = slack.click(url(gw), *where[0], SLACK_ALICE, "approve_grant", reason="restock all day")
    assert answer.json()["state"] == "approved" and held.result(timeout=10).status_code == 200
    later = send(gw, token(sub="crew-buyer", groups=["buyers"]), "/stock/41", {"tag": "grant-from-slack-2"})
    assert later.status_code == 200 and len(reached(upstream, "grant-from-slack-2")) == 1
