"""Just-in-time approval of single operations, end to end: real gateway, real agents held
mid-request, approvers acting through the approvals API on the gateway's own listener,
webhooks to real receivers, restarts with approvals in flight."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.approvals import (
    Approver,
    make_gateway,
    pending_for,
    send,
    start,
    wait_for,
)
from tests.support.gateway import BIN, Gateway
from tests.support.servers import Receiver
from tests.support.slack import SlackStandIn

SLACK_CHANNEL = "C0APPROVALS"


@pytest.fixture(scope="module")
def hooks():
    json_hook, slack_api, broken = Receiver(), SlackStandIn("xoxb-test-bot", "slack-signing-secret"), Receiver(failing=True)
    yield json_hook, slack_api, broken
    for r in (json_hook, slack_api, broken):
        r.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, hooks) -> Gateway:
    json_hook, slack_api, broken = hooks
    gateway = start(make_gateway(tmp_path_factory.mktemp("approvals"), servers, webhooks=[
        {"url": json_hook.url, "format": "json"},
        {"url": broken.url},
    ], approvals={"slack": {"bot_token": "env:SLACK_BOT_TOKEN", "signing_secret": "env:SLACK_SIGNING_SECRET",
                            "channels": [SLACK_CHANNEL], "api_url": slack_api.api_url}},
        env={"SLACK_BOT_TOKEN": "xoxb-test-bot", "SLACK_SIGNING_SECRET": "slack-signing-secret"}))
    yield gateway
    gateway.stop()


@pytest.fixture
def people(gw, token):
    return {
        "buyer": token(sub="crew-buyer", groups=["buyers"]),
        "m1": Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"])),
        "m2": Approver(gw.approvals_url, token(sub="manager-2", groups=["managers"])),
        "analyst": Approver(gw.approvals_url, token(sub="analyst-1", groups=["analysts"])),
        "security": Approver(gw.approvals_url, token(sub="security-lead", groups=["security"])),
    }


@pytest.fixture
def agents():
    pool = ThreadPoolExecutor(max_workers=32)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def reached(upstream, marker: str) -> list:
    return [g for g in upstream.received if marker.encode() in g.body]


# quorum, self-approval, eligibility, denial


def test_quorum_of_two_from_a_group(gw, people, agents, upstream):
    held = agents.submit(send, gw, people["buyer"], "/orders", {"item": 7, "quantity": 500, "tag": "quorum"}, "https")
    approval = pending_for(people["m1"], "quorum")
    assert approval["requester"]["subject"] == "crew-buyer" and approval["rules"] == ["orders-need-two-managers"]
    assert approval["approvers"] == ["group:managers"] and approval["held"] is True
    assert people["m1"].vote(approval["id"], "approve", "looks fine").json()["state"] == "pending"
    time.sleep(0.5)
    assert not held.done() and reached(upstream, "quorum") == []  # one vote is not enough
    second = people["m2"].vote(approval["id"], "approve")
    assert second.status_code == 200 and second.json()["state"] == "approved"
    r = held.result(timeout=10)
    assert r.status_code == 200 and r.json()["path"] == "/orders"
    assert len(reached(upstream, "quorum")) == 1
    done = people["m1"].show(approval["id"])
    assert done["state"] == "executed" and [v["approver"] for v in done["votes"]] == ["manager-1", "manager-2"]
    steps = [e["detail"].get("step") for e in done["timeline"] if e["kind"] == "approval"]
    assert steps[:1] == ["requested"] and "vote" in steps and steps[-1] in ("executed", "notified", "notify_failed")
    assert {"approved", "executed"} <= set(steps)
    decision = [e for e in done["timeline"] if e["kind"] == "decision"][0]
    assert decision["effect"] == "allow" and "approved by manager-1, manager-2" in decision["reason"]


def test_the_requester_can_never_approve_their_own_request(gw, people, agents, token):
    both = token(sub="crew-lead", groups=["buyers", "managers"])
    held = agents.submit(send, gw, both, "/orders", {"quantity": 900, "tag": "self"})
    approval = pending_for(people["m1"], "self")
    own = Approver(gw.approvals_url, both).vote(approval["id"], "approve")
    assert own.status_code == 403 and own.json()["error"] == "self_approval"
    same_subject = Approver(gw.approvals_url, token(sub="crew-lead", groups=["managers"])).vote(approval["id"], "approve")
    assert same_subject.status_code == 403 and same_subject.json()["error"] == "self_approval"
    people["m1"].vote(approval["id"], "deny", "no self-service")
    assert held.result(timeout=10).status_code == 403


def test_one_approver_counts_once_and_others_are_not_approvers(gw, people, agents, upstream):
    held = agents.submit(send, gw, people["buyer"], "/orders", {"quantity": 501, "tag": "once"})
    approval = pending_for(people["m1"], "once")
    assert people["m1"].vote(approval["id"], "approve").status_code == 200
    again = people["m1"].vote(approval["id"], "approve")
    assert again.status_code == 409 and again.json()["error"] == "already_voted"
    stranger = people["analyst"].vote(approval["id"], "approve")
    assert stranger.status_code == 403 and stranger.json()["error"] == "not_an_approver"
    assert "group:managers" in stranger.json()["reason"]
    assert people["m1"].show(approval["id"])["state"] == "pending"
    people["m2"].vote(approval["id"], "deny", "changed my mind")
    assert held.result(timeout=10).status_code == 403
    assert reached(upstream, "once") == []


def test_denial_with_a_reason(gw, people, agents, upstream):
    held = agents.submit(send, gw, people["buyer"], "/orders", {"quantity": 5000, "tag": "deny"})
    approval = pending_for(people["m1"], "deny")
    no_reason = people["m1"].vote(approval["id"], "deny", "")
    assert no_reason.status_code == 400 and no_reason.json()["error"] == "reason_required"
    assert people["m1"].vote(approval["id"], "deny", "5000 units is more than the warehouse holds").status_code == 200
    r = held.result(timeout=10)
    assert r.status_code == 403
    answer = r.json()
    assert answer["error"] == "approval_denied" and answer["state"] == "denied"
    assert answer["approval_id"] == approval["id"]
    assert answer["reason"] == "denied by manager-1: 5000 units is more than the warehouse holds"
    assert reached(upstream, "deny") == []
    late = people["m2"].vote(approval["id"], "approve")
    assert late.status_code == 409 and late.json()["error"] == "not_pending"


def test_every_matching_review_needs_its_own_quorum(gw, people, agents, upstream):
    held = agents.submit(send, gw, people["buyer"], "/dual", {"tag": "dual"})
    approval = pending_for(people["m1"], "dual")
    assert people["m1"].vote(approval["id"], "approve").json()["state"] == "pending"
    assert people["security"].vote(approval["id"], "approve").json()["state"] == "approved"
    assert held.result(timeout=10).status_code == 200
    assert len(reached(upstream, "dual")) == 1


# timeouts, late execution, fingerprints


def test_timeout_then_late_execution_exactly_once(gw, people, upstream, token):
    body = {"quantity": 42, "tag": "late"}
    first = send(gw, people["buyer"], "/quick", body)
    assert first.status_code == 403
    answer = first.json()
    assert (answer["error"], answer["state"]) == ("approval_pending", "pending")
    assert answer["reason"].startswith("waiting for approval by group:managers")
    approval_id = answer["approval_id"]
    assert reached(upstream, "late") == []
    assert people["m1"].show(approval_id)["held"] is False
    assert people["m1"].vote(approval_id, "approve", "ok later").json()["state"] == "approved"
    # a different body, or a different principal, does not ride on this approval
    other_body = send(gw, people["buyer"], "/quick", {"quantity": 43, "tag": "late"})
    assert other_body.status_code == 403 and other_body.json()["approval_id"] != approval_id
    other_agent = send(gw, token(sub="crew-other", groups=["buyers"]), "/quick", body)
    assert other_agent.status_code == 403 and other_agent.json()["approval_id"] != approval_id
    # nor does the same request with a header added (the upstream would see it)
    extra = send(gw, people["buyer"], "/quick", body, **{"X-HTTP-Method-Override": "PUT"})
    assert extra.status_code == 403 and extra.json()["approval_id"] != approval_id
    # the identical request from the same principal goes through, once (a new token is fine)
    replay = send(gw, token(sub="crew-buyer", groups=["buyers"]), "/quick", body)
    assert replay.status_code == 200
    assert len(reached(upstream, "late")) == 1
    assert people["m1"].show(approval_id)["state"] == "executed"
    again = send(gw, people["buyer"], "/quick", body)
    assert again.status_code == 403 and again.json()["error"] == "approval_pending"
    assert again.json()["approval_id"] != approval_id
    assert len(reached(upstream, "late")) == 1


def test_pending_approvals_expire(gw, people, hooks):
    json_hook = hooks[0]
    r = send(gw, people["buyer"], "/short", {"tag": "expiring"})
    approval_id = r.json()["approval_id"]
    wait_for(lambda: people["m1"].show(approval_id)["state"] == "expired", timeout=10)
    expired = people["m1"].vote(approval_id, "approve")
    assert expired.status_code == 409 and "expired" in expired.json()["reason"]
    wait_for(lambda: any(h["event"] == "approval.expired" and h["approval"]["id"] == approval_id
                         for h in json_hook.received))


def test_a_client_that_goes_away_abandons_its_approval(gw, people, upstream, token):
    body = json.dumps({"quantity": 700, "tag": "gone"}).encode()
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            b"POST http://api.test/orders HTTP/1.1\r\nHost: api.test\r\ncontent-type: application/json\r\n"
            + f"Proxy-Authorization: Bearer {people['buyer']}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
        )
        approval = pending_for(people["m1"], "gone")
    wait_for(lambda: people["m1"].show(approval["id"])["state"] == "abandoned")
    assert people["m1"].vote(approval["id"], "approve").status_code == 409
    assert reached(upstream, "gone") == []
    assert people["m1"].show(approval["id"])["outcome"] == "the client went away while the request was held"


# concurrency


def test_held_requests_do_not_hold_up_anyone_else(gw, people, agents, token, upstream):
    held = [agents.submit(send, gw, people["buyer"], "/orders", {"tag": f"crowd-{n}"}) for n in range(20)]
    wait_for(lambda: len([a for a in people["m1"].list() if "crowd-" in a["request"]["body"]]) == 20)
    reader = gw.session(token(groups=["analysts"]))
    with ThreadPoolExecutor(max_workers=8) as pool:
        passing = list(pool.map(lambda n: reader.get(f"http://api.test/items/{n}", timeout=30).status_code, range(200)))
    assert passing == [200] * 200
    assert not any(h.done() for h in held)  # all 200 went through while the 20 were still held
    for a in [a for a in people["m1"].list() if "crowd-" in a["request"]["body"]]:
        assert people["m1"].vote(a["id"], "deny", "not today").status_code == 200
    assert [h.result(timeout=15).status_code for h in held] == [403] * 20
    assert not any(b"crowd-" in g.body for g in upstream.received)


# notifications


def test_webhooks_carry_pending_and_decided(gw, people, agents, hooks):
    json_hook, slack_api, broken = hooks
    held = agents.submit(send, gw, people["buyer"], "/orders", {"quantity": 600, "tag": "hooked"},
                         **{"X-Custody-Model": "gpt-4o", "X-Custody-Task": "restock"})
    approval = pending_for(people["m1"], "hooked")
    pending = wait_for(lambda: next((h for h in json_hook.received if h["event"] == "approval.pending"
                                     and h["approval"]["id"] == approval["id"]), None))
    assert pending["approval"]["requester"]["subject"] == "crew-buyer"
    assert pending["approval"]["requester"]["agent"] == {"model": "gpt-4o", "task": "restock"}
    assert pending["approval"]["operation"]["summary"] == "POST /orders on api"
    assert pending["approval"]["rules"] == ["orders-need-two-managers"]
    assert pending["links"]["page"] == f"{gw.approvals_url}/#/approvals/{approval['id']}"
    slack = wait_for(lambda: next((c.params for c in slack_api.called("chat.postMessage")
                                   if approval["id"] in json.dumps(c.params["blocks"])), None))
    assert slack["channel"] == SLACK_CHANNEL
    assert "*crew-buyer* (gpt-4o) wants to `POST /orders on api` (risk 40)" in slack["text"]
    buttons = next(b for b in slack["blocks"] if b["type"] == "actions")["elements"]
    assert [(b["action_id"], b.get("value")) for b in buttons[:2]] == [("approve", approval["id"]), ("deny", approval["id"])]
    assert buttons[-1]["url"] == f"{gw.approvals_url}/#/approvals/{approval['id']}"  # a link only opens the page
    # the broken receiver was retried, gave up, and that did nothing to the hold
    wait_for(lambda: any(s["detail"].get("step") == "notify_failed" for s in people["m1"].show(approval["id"])["timeline"]))
    assert broken.attempts >= 3 and not held.done()
    people["m1"].vote(approval["id"], "approve")
    people["m2"].vote(approval["id"], "approve")
    assert held.result(timeout=10).status_code == 200
    decided = wait_for(lambda: next((h for h in json_hook.received if h["event"] == "approval.decided"
                                     and h["approval"]["id"] == approval["id"]), None))
    assert decided["approval"]["state"] == "approved"
    assert [v["approver"] for v in decided["approval"]["votes"]] == ["manager-1", "manager-2"]
    timeline = people["m1"].show(approval["id"])["timeline"]
    notified = {(e["detail"]["notification"], e["detail"]["target"]) for e in timeline if e["detail"].get("step") == "notified"}
    assert ("pending", json_hook.url) in notified and ("pending", f"slack:{SLACK_CHANNEL}") in notified


# the API itself


def test_api_lists_filters_and_records_every_call(gw, people):
    send(gw, people["buyer"], "/quick", {"tag": "listed"})  # an approval to find
    r = people["m1"].session.get(f"{gw.approvals_url}/approvals", params={"connection": "api", "requester": "crew-buyer", "state": ""})
    assert r.status_code == 200 and all(a["requester"]["subject"] == "crew-buyer" for a in r.json()["approvals"])
    missing = people["m1"].session.get(f"{gw.approvals_url}/approvals/{'0' * 32}")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    # approvals carry request bodies: a principal who is neither approver nor requester sees none
    assert people["analyst"].list(state="") == []
    some = people["m1"].list(state="")[0]
    hidden = people["analyst"].session.get(f"{gw.approvals_url}/approvals/{some['id']}")
    assert hidden.status_code == 404
    mine = Approver(gw.approvals_url, people["buyer"]).list(state="")
    assert mine and all(a["requester"]["subject"] == "crew-buyer" for a in mine)
    anonymous = requests.get(f"{gw.approvals_url}/approvals", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthenticated"
    recorded = gw.events("kind = 'request' AND connection = 'custody' AND subject = 'manager-1'")
    assert recorded and json.loads(recorded[-1]["operation"])["resource"].startswith("/approvals")
    through_proxy = gw.session(None).get("http://custody.gateway/approvals",
                                        headers={"Authorization": people["m1"].session.headers["Authorization"]})
    assert through_proxy.status_code == 200


def test_approvals_survive_a_restart_and_held_flows_are_abandoned(tmp_path, servers, token, upstream):
    """A crash (SIGKILL) with a request held; a graceful stop is tests/test_replicas.py's."""
    first = start(make_gateway(tmp_path, servers))
    buyer = token(sub="crew-buyer", groups=["buyers"])
    manager = Approver(first.approvals_url, token(sub="manager-1", groups=["managers"]))
    waiting = send(first, buyer, "/quick", {"tag": "restart-late"})  # times out: pending, not held
    late_id = waiting.json()["approval_id"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        held = pool.submit(send, first, buyer, "/orders", {"tag": "restart-held"})
        held_id = pending_for(manager, "restart-held")["id"]
        first.kill()
        with pytest.raises(requests.RequestException):
            held.result(timeout=20)
    second = start(first)  # the same configuration and audit store, a new process
    try:
        assert manager.show(held_id)["state"] == "abandoned"
        assert manager.show(held_id)["outcome"] == "the gateway restarted while the request was held"
        assert manager.vote(held_id, "approve").status_code == 409
        assert manager.show(late_id)["state"] == "pending"
        assert manager.vote(late_id, "approve").json()["state"] == "approved"
        assert send(second, buyer, "/quick", {"tag": "restart-late"}).status_code == 200
        assert not any(b"restart-held" in g.body for g in upstream.received)
        assert second.custody("audit", "verify").returncode == 0
    finally:
        second.stop()


def test_the_cli_lists_shows_approves_and_denies(gw, people, agents, token, upstream):
    def cli(*args: str, who: str = "manager-1") -> subprocess.CompletedProcess:
        env = {**gw.env, "CUSTODY_CONFIG": str(gw.config_file),
               "CUSTODY_APPROVER_TOKEN": token(sub=who, groups=["managers"])}
        return subprocess.run([str(BIN / "custody"), "approvals", *args], capture_output=True, text=True, env=env, timeout=60)

    held = agents.submit(send, gw, people["buyer"], "/orders", {"quantity": 800, "tag": "cli-approve"})
    other = agents.submit(send, gw, people["buyer"], "/orders", {"quantity": 900, "tag": "cli-deny"})
    first, second = pending_for(people["m1"], "cli-approve"), pending_for(people["m1"], "cli-deny")
    listing = cli("list")
    assert listing.returncode == 0
    line = next(l for l in listing.stdout.splitlines() if l.startswith(first["id"]))
    assert "pending" in line and "crew-buyer" in line and "POST /orders on api" in line and "[orders-need-two-managers]" in line
    shown = cli("show", first["id"])
    assert "operation  POST /orders on api  [action write, risk 40]" in shown.stdout
    assert '"tag": "cli-approve"' in shown.stdout and "requested" in shown.stdout
    assert cli("approve", first["id"], "--reason", "fine").stdout.strip() == f"{first['id']}: pending"
    done = cli("approve", first["id"], who="manager-2")
    assert done.stdout.strip() == f"{first['id']}: approved (approved by manager-1, manager-2: fine)"
    assert held.result(timeout=10).status_code == 200
    no_reason = cli("deny", second["id"])
    assert no_reason.returncode == 1 and "a denial needs a reason" in no_reason.stderr
    twice = cli("approve", first["id"])
    assert twice.returncode == 1 and "409: approval" in twice.stderr
    assert cli("deny", second["id"], "--reason", "too much").returncode == 0
    assert other.result(timeout=10).json()["reason"] == "denied by manager-1: too much"
    timeline = subprocess.run([str(BIN / "custody"), "audit", "show", first["id"], "--db", str(gw.db), "--json"],
                              capture_output=True, text=True, timeout=60)
    kinds = [e["kind"] for e in json.loads(timeline.stdout)]
    assert kinds[0] == "approval" and "decision" in kinds and "response" in kinds


def test_the_lean_runner_holds_and_serves_approvals_too(tmp_path, servers, token, upstream):
    gw = start(make_gateway(tmp_path, servers, runner="custody"))
    try:
        buyer = token(sub="crew-buyer", groups=["buyers"])
        manager = Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))
        with ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(send, gw, buyer, "/restock", {"tag": "lean-held"})
            approval = pending_for(manager, "lean-held")
            assert manager.vote(approval["id"], "approve").json()["state"] == "approved"
            assert held.result(timeout=10).status_code == 200
        assert len(reached(upstream, "lean-held")) == 1
    finally:
        gw.stop()


def test_the_cli_never_takes_the_agents_token_for_an_approvers(gw, token):
    """$CUSTODY_TOKEN is the agent's (the client helper and ssh use it): a bare approvals
    command in an agent's shell refuses instead of acting as the agent."""
    env = {**gw.env, "CUSTODY_CONFIG": str(gw.config_file), "CUSTODY_TOKEN": token(sub="crew", groups=["managers"])}
    env.pop("CUSTODY_APPROVER_TOKEN", None)
    out = subprocess.run([str(BIN / "custody"), "approvals", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == "an approver's token is needed: pass --token or set CUSTODY_APPROVER_TOKEN"
