"""Approvers across replicas: two real `custody run` replicas on one real PostgreSQL store,
each signing approvers in with the test IdP and posting to the Slack stand-in. Whatever one
replica decides — a vote on its API, a click on its Slack endpoint, a grant issued or
revoked — the other sees: the Slack copies the other posted are updated, a grant issued on
one covers requests on the other, and the inbox on one hears decisions made on the other."""

from __future__ import annotations

import json

import pytest
import requests
import yaml

from tests.conftest import standard_identity
from tests.support.approvals import Approver, make_gateway, pending_for, send, wait_for
from tests.support.approvers import (
    ALICE,
    BOT_TOKEN,
    CHANNELS,
    RULES,
    SIGNING_SECRET,
    SLACK_ALICE,
    Browserless,
    agents,  # noqa: F401  (a fixture)
)
from tests.support.oidc import Provider
from tests.support.servers import free_port
from tests.support.slack import SlackStandIn
from tests.test_replicas import ENV, database, ready
from tests.test_replicas import environment, pg  # noqa: F401  (fixtures: the store's password, a real PostgreSQL)


@pytest.fixture(scope="module")
def idp():
    op = Provider([ALICE])
    yield op
    op.stop()


@pytest.fixture(scope="module")
def slack():
    api = SlackStandIn(BOT_TOKEN, SIGNING_SECRET)
    api.users.update({SLACK_ALICE: ALICE.email})
    yield api
    api.stop()


def replica(directory, servers, url: str, idp: Provider, slack: SlackStandIn, sweep: str):
    identity = standard_identity(servers.jwks)
    identity["issuers"].append({"issuer": idp.issuer, "audience": "custody-approvals", "discovery": True, "leeway": 5})
    gw = make_gateway(directory, servers, runner="custody", port=free_port(), rules=RULES, identity=identity,
                      store={"url": url, "password": "env:CUSTODY_TEST_STORE_PASSWORD"},
                      approvals={"oidc": {"issuer": idp.issuer, "client_id": "custody-approvals",
                                          "client_secret": "env:OIDC_CLIENT_SECRET"},
                                 "slack": {"bot_token": "env:SLACK_BOT_TOKEN",
                                           "signing_secret": "env:SLACK_SIGNING_SECRET",
                                           "channels": CHANNELS, "api_url": slack.api_url}},
                      env={**ENV, "OIDC_CLIENT_SECRET": idp.client.client_secret, "SLACK_BOT_TOKEN": BOT_TOKEN,
                           "SLACK_SIGNING_SECRET": SIGNING_SECRET})
    gw.config["approvals"]["sweep"] = sweep
    gw.config["gateway"] = {"lease": "3s", "grace": "5s"}
    gw.config["masking"] = {"hash_key": "env:CUSTODY_TEST_HASH_KEY"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    idp.client.redirect_uris.append(f"{gw.approvals_url}/auth/oidc/callback")
    return gw


@pytest.fixture(scope="module")
def pair(tmp_path_factory, servers, pg, idp, slack):
    """Replicas A and B. A sweeps once a minute: what it learns sooner of B's changes comes
    from the store's notifications."""
    url = database(pg)
    root = tmp_path_factory.mktemp("approvers-pair")
    a = replica(root / "a", servers, url, idp, slack, sweep="60s")
    b = replica(root / "b", servers, url, idp, slack, sweep="200ms")
    for gw in (a, b):
        gw.start()
        wait_for(lambda: ready(gw), timeout=60)
    Browserless(b).sign_in(ALICE)  # on B: the directory entry binding Slack's alice is in the store for both
    yield a, b
    for gw in (a, b):
        gw.stop()


@pytest.fixture
def people(token):
    return {"buyer": token(sub="crew-buyer", groups=["buyers"]), "m1": token(sub="manager-1", groups=["managers"])}


def buttons(version: dict) -> list[str]:
    return [e["action_id"] for b in version["blocks"] if b["type"] == "actions" for e in b["elements"]]


def vote_on_b_api(b, approval, people, slack, where):
    assert Approver(b.approvals_url, people["m1"]).vote(approval["id"], "approve", "fine by B").status_code == 200
    return "approved by manager-1: fine by B"


def click_on_b_slack_endpoint(b, approval, people, slack, where):
    answer = slack.click(f"{b.approvals_url}/slack/interactions", *where[0], SLACK_ALICE, "approve",
                         reason="ok in Slack")
    assert answer.status_code == 200 and answer.json()["state"] == "approved", answer.text
    return "approved by alice: ok in Slack"


@pytest.mark.parametrize("decide", [vote_on_b_api, click_on_b_slack_endpoint])
def test_slack_copies_posted_by_one_replica_are_updated_by_a_decision_on_the_other(pair, people, slack, agents,
                                                                                    upstream, decide):
    a, b = pair
    tag = f"posted-on-a-{decide.__name__}"
    held = agents.submit(send, a, people["buyer"], "/restock", {"tag": tag})
    approval = pending_for(Approver(b.approvals_url, people["m1"]), tag)
    where = wait_for(lambda: len(found := slack.posted_for(approval["id"])) == len(CHANNELS) and found)
    said = decide(b, approval, people, slack, where)
    assert held.result(timeout=20).status_code == 200
    assert len([g for g in upstream.received if tag.encode() in g.body]) == 1
    wait_for(lambda: all(said in json.dumps(slack.messages[k][-1]["blocks"]) and buttons(slack.messages[k][-1])
                         == ["details"] for k in where))


def test_a_grant_issued_on_one_replica_covers_the_other_until_revoked_on_either(pair, people, agents, upstream):
    a, b = pair
    manager_on_a, manager_on_b = Approver(a.approvals_url, people["m1"]), Approver(b.approvals_url, people["m1"])
    held = agents.submit(send, a, people["buyer"], "/stock/41", {"tag": "grant-across-0"})
    approval = pending_for(manager_on_b, "grant-across-0")
    voted = manager_on_b.session.post(f"{b.approvals_url}/approvals/{approval['id']}/approve",
                                      json={"reason": "for the afternoon", "grant": "10m"}, timeout=10)
    assert voted.status_code == 200 and voted.json()["grant"]["state"] == "active"
    assert held.result(timeout=20).status_code == 200
    grant = voted.json()["grant"]
    covered = send(b, people["buyer"], "/stock/41", {"tag": "grant-across-1"})  # on B, no hold
    assert covered.status_code == 200 and len([g for g in upstream.received if b"grant-across-1" in g.body]) == 1
    revoked = manager_on_a.session.post(f"{a.approvals_url}/grants/{grant['id']}/revoke", json={"reason": "done"},
                                        timeout=10)
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert [g["state"] for g in manager_on_b.session.get(f"{b.approvals_url}/grants", timeout=10).json()["grants"]
            if g["id"] == grant["id"]] == ["revoked"]
    again = agents.submit(send, b, people["buyer"], "/stock/41", {"tag": "grant-across-2"})
    after = pending_for(manager_on_a, "grant-across-2")  # held again: the grant is over everywhere
    assert manager_on_a.vote(after["id"], "deny", "the grant was revoked").status_code == 200
    assert again.result(timeout=20).status_code == 403
    assert not [g for g in upstream.received if b"grant-across-2" in g.body]


def inbox(gw, token: str, last: str = "") -> tuple[str, list[str], list[dict]]:
    """One answer of the inbox: its last mark, its event names and its approval events' data."""
    text = requests.get(f"{gw.approvals_url}/approvals/events", timeout=40,
                        headers={"authorization": f"Bearer {token}", **({"last-event-id": last} if last else {})}).text
    marks = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: {}"]
    return marks[-1], names, data


def test_the_inbox_on_one_replica_hears_a_decision_made_on_the_other(pair, people, agents):
    a, b = pair
    mark, names, _ = inbox(a, people["m1"])
    assert names == ["ready"]
    held = agents.submit(send, b, people["buyer"], "/restock", {"tag": "inbox-across"})
    approval = pending_for(Approver(b.approvals_url, people["m1"]), "inbox-across")
    assert Approver(b.approvals_url, people["m1"]).vote(approval["id"], "deny", "seen from A").status_code == 200
    assert held.result(timeout=20).status_code == 403

    def heard_denied():
        nonlocal mark
        mark, _, data = inbox(a, people["m1"], mark)
        return any(d["id"] == approval["id"] and d["state"] == "denied" for d in data)

    wait_for(heard_denied, timeout=30)


def test_a_mark_from_another_replica_makes_the_inbox_reload(pair, people):
    a, b = pair
    mark_of_b, _, _ = inbox(b, people["m1"])
    _, names, _ = inbox(a, people["m1"], mark_of_b)
    assert names == ["reload"]
