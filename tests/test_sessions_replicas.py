"""Approvers' sign-ins and sessions across replicas: two real `custody run` replicas on one
real PostgreSQL store behind one public URL (as behind a load balancer without affinity),
the Authlib OIDC provider, the pysaml2 IdP and the Slack stand-in of tests/support, and
`custody run --workers 2` on a SQLite store. Whichever replica each step of a sign-in, a
session or a Slack click reaches, it is the same sign-in, the same session, the same click:
started on one and finished on the other, used on one and ended on the other, replayed on
the other and refused. The store keeps only the cookie's hash, and a store that cannot
answer signs nobody in (503 `audit_unavailable`) until it is back."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests
import yaml

from examples.samples.postgres import PostgresServer
from tests.conftest import standard_identity
from tests.support.approvals import Approver, make_gateway, pending_for, send, wait_for
from tests.support.approvers import (
    ALICE,
    BOB,
    BOT_TOKEN,
    CHANNELS,
    RULES,
    SIGNING_SECRET,
    SLACK_ALICE,
    SLACK_STRANGER,
    agents,  # noqa: F401  (a fixture)
)
from tests.support.gateway import Gateway
from tests.support.oidc import Provider, User
from tests.support.saml import IdentityProvider
from tests.support.servers import free_port
from tests.support.slack import SlackStandIn
from tests.test_approvers_replicas import idp, slack  # noqa: F401  (fixtures: the OIDC provider, the Slack stand-in)
from tests.test_replicas import ENV, PASSWORD, database, ready, reached
from tests.test_sso import saml  # noqa: F401  (the fixture: the SAML IdP)
from tests.test_replicas import environment, pg  # noqa: F401  (fixtures: the store's password, a real PostgreSQL)

SIGNED_OUT = "no such session: sign in again"
NO_STATE = "state does not match any sign-in in progress (expired, used already, or forged)"
UNSOLICITED = "the response answers no sign-in this gateway started (unsolicited, expired or replayed)"


def replica(directory, servers, public: str, idp: Provider, slack: SlackStandIn, *, store: dict | None = None,
            saml: IdentityProvider | None = None, run_args: tuple[str, ...] = ()) -> Gateway:
    """A `custody run` gateway whose approvals page is at `public` (the balancer's address,
    the same for every replica: it is what the IdP redirects to and what SAML addresses)."""
    identity = standard_identity(servers.jwks)
    identity["issuers"].append({"issuer": idp.issuer, "audience": "custody-approvals", "discovery": True, "leeway": 5})
    approvals = {"public_url": public,
                 "oidc": {"issuer": idp.issuer, "client_id": "custody-approvals",
                          "client_secret": "env:OIDC_CLIENT_SECRET"},
                 "slack": {"bot_token": "env:SLACK_BOT_TOKEN", "signing_secret": "env:SLACK_SIGNING_SECRET",
                           "channels": CHANNELS, "api_url": slack.api_url}}
    if saml is not None:
        approvals["saml"] = {"idp_metadata": str(saml.metadata_file)}
    gw = make_gateway(directory, servers, runner="custody", port=free_port(), rules=RULES, identity=identity,
                      approvals=approvals, run_args=run_args, **({"store": store} if store else {}),
                      env={**ENV, "OIDC_CLIENT_SECRET": idp.client.client_secret, "SLACK_BOT_TOKEN": BOT_TOKEN,
                           "SLACK_SIGNING_SECRET": SIGNING_SECRET})
    gw.config["approvals"]["sweep"] = "200ms"
    gw.config["gateway"] = {"lease": "3s", "grace": "5s"}
    gw.config["masking"] = {"hash_key": "env:CUSTODY_TEST_HASH_KEY"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    if f"{public}/auth/oidc/callback" not in idp.client.redirect_uris:
        idp.client.redirect_uris.append(f"{public}/auth/oidc/callback")
    return gw


def pg_store(url: str) -> dict:
    return {"url": url, "password": "env:CUSTODY_TEST_STORE_PASSWORD"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, servers, pg, idp, saml, slack):
    """Replicas A and B on one PostgreSQL store, one public URL (where nothing listens: each
    test sends each step to the replica it names)."""
    url = database(pg)
    root = tmp_path_factory.mktemp("sessions-pair")
    public = f"http://127.0.0.1:{free_port()}"
    a = replica(root / "a", servers, public, idp, slack, store=pg_store(url), saml=saml)
    b = replica(root / "b", servers, public, idp, slack, store=pg_store(url), saml=saml)
    for gw in (a, b):
        gw.start()
        wait_for(lambda: ready(gw), timeout=60)
    saml.trust(requests.get(f"{a.approvals_url}/auth/saml/metadata", timeout=10).content)
    yield a, b, url
    for gw in (a, b):
        gw.stop()


@pytest.fixture
def people(token):
    return {"buyer": token(sub="crew-buyer", groups=["buyers"]), "m1": token(sub="manager-1", groups=["managers"])}


def on(gw: Gateway, url: str) -> str:
    """`url` (at the public address) sent to replica `gw` instead."""
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(netloc=gw.approvals_url.split("//", 1)[1]))


class Browser:
    """An approver's browser as plain HTTP: one cookie jar, whichever replica it reaches
    (cookies are per host, not per port, so both replicas see the same cookies)."""

    def __init__(self, fresh_connections: bool = False) -> None:
        self.http = requests.Session()
        self.http.trust_env = False
        if fresh_connections:  # each request on a connection of its own: the kernel picks a worker for each
            self.http.hooks["response"].append(lambda response, **_: response.connection.close())

    def start(self, gw: Gateway) -> str:
        """GET /auth/oidc/login on `gw`: the provider's authorization URL."""
        answer = self.http.get(f"{gw.approvals_url}/auth/oidc/login", allow_redirects=False, timeout=30)
        assert answer.status_code == 303, answer.text
        return answer.headers["location"]

    @staticmethod
    def at_idp(authorize: str, user: User) -> str:
        """The user signs in at the provider: the callback URL (at the public address) it redirects to."""
        answer = requests.post(authorize, data={"username": user.username, "password": user.password},
                               allow_redirects=False, timeout=10)
        assert answer.status_code in (302, 303), answer.text
        return answer.headers["location"]

    def finish(self, gw: Gateway, callback: str) -> requests.Response:
        return self.http.get(on(gw, callback), allow_redirects=False, timeout=30)

    def sign_in(self, start: Gateway, finish: Gateway, user: User = ALICE) -> None:
        answer = self.finish(finish, self.at_idp(self.start(start), user))
        assert answer.status_code == 303, answer.text

    def me(self, gw: Gateway) -> requests.Response:
        return self.http.get(f"{gw.approvals_url}/auth/me", timeout=30)

    def post(self, gw: Gateway, path: str, csrf: str, **body) -> requests.Response:
        return self.http.post(f"{gw.approvals_url}{path}", json=body, headers={"x-csrf-token": csrf}, timeout=30)

    def cookie(self) -> str:
        return self.http.cookies["custody_session"]


def refusal(answer: requests.Response) -> tuple[int, str, str]:
    return answer.status_code, answer.json()["error"], answer.json()["reason"]


# a session is the store's, not a replica's


def test_signed_in_on_one_replica_approving_on_the_other_signed_out_there_refused_on_both(pair, people, agents,
                                                                                          upstream):
    a, b, url = pair
    alice = Browser()
    alice.sign_in(start=a, finish=a)
    me_on_b = alice.me(b).json()
    assert (me_on_b["signed_in"], me_on_b["subject"], me_on_b["method"]) == (True, "alice", "oidc")
    assert me_on_b["csrf"] == alice.me(a).json()["csrf"]  # one session, one CSRF token

    held = agents.submit(send, a, people["buyer"], "/restock", {"tag": "session-across"})
    approval = pending_for(Approver(a.approvals_url, people["m1"]), "session-across")
    assert refusal(alice.post(b, f"/approvals/{approval['id']}/approve", "not-the-token")) == (
        403, "csrf_failed", "the x-csrf-token header does not match this session's token")
    voted = alice.post(b, f"/approvals/{approval['id']}/approve", me_on_b["csrf"], reason="approved on B")
    assert (voted.status_code, voted.json()["state"]) == (200, "approved"), voted.text
    assert held.result(timeout=30).status_code == 200
    assert len(reached(upstream, "session-across")) == 1

    with psycopg.connect(url, password=PASSWORD) as conn:  # what the store keeps of the session
        rows = conn.execute("SELECT * FROM web_sessions").fetchall()
    assert hashlib.sha256(alice.cookie().encode()).hexdigest() in [r[0] for r in rows]
    assert not [r for r in rows if alice.cookie() in json.dumps(r, default=str)]  # never the cookie itself

    cookie = alice.cookie()
    assert alice.post(b, "/auth/logout", me_on_b["csrf"]).json()["signed_in"] is False
    for gw in (a, b):  # a client that keeps the cookie anyway (or stole it) has nothing, on either replica
        kept = requests.get(f"{gw.approvals_url}/approvals", cookies={"custody_session": cookie}, timeout=30)
        assert refusal(kept) == (401, "unauthenticated", SIGNED_OUT)
        me = requests.get(f"{gw.approvals_url}/auth/me", cookies={"custody_session": cookie}, timeout=30)
        assert me.json()["signed_in"] is False


@pytest.mark.parametrize("started, finished, replayed", [("a", "b", "a"), ("a", "a", "b"), ("b", "a", "b")])
def test_a_sign_in_started_on_one_replica_finishes_on_either_once(pair, started, finished, replayed):
    gateways = dict(zip("ab", pair[:2]))
    alice = Browser()
    callback = alice.at_idp(alice.start(gateways[started]), ALICE)
    first = alice.finish(gateways[finished], callback)
    assert first.status_code == 303 and "custody_session=" in first.headers["set-cookie"], first.text
    assert alice.me(gateways[replayed]).json()["signed_in"] is True
    thief = Browser()  # the same callback again, with the same browser cookie, at the other replica
    thief.http.cookies.update(alice.http.cookies)
    thief.http.cookies.set("custody_session", None)
    again = thief.finish(gateways[replayed], callback)
    assert refusal(again) == (400, "signin_failed", NO_STATE)
    assert thief.me(gateways[replayed]).json()["signed_in"] is False


def test_one_callback_sent_to_both_replicas_at_once_signs_in_once(pair):
    a, b, _ = pair
    alice = Browser()
    callback = alice.at_idp(alice.start(a), ALICE)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda gw: alice.finish(gw, callback), (a, b)))
    assert sorted(r.status_code for r in answers) == [303, 400]
    assert [refusal(r) for r in answers if r.status_code == 400] == [(400, "signin_failed", NO_STATE)]


def saml_request(gw: Gateway, saml: IdentityProvider) -> dict:
    """A SAML sign-in `gw` started: the AuthnRequest as the IdP received it."""
    location = requests.get(f"{gw.approvals_url}/auth/saml/login", allow_redirects=False, timeout=10)
    assert location.status_code == 303
    requests.get(location.headers["location"], timeout=10).raise_for_status()
    return saml.requests[-1]


@pytest.mark.parametrize("started, answered, replayed", [("a", "b", "a"), ("b", "b", "a")])
def test_a_saml_response_is_accepted_by_either_replica_once(pair, saml, started, answered, replayed):
    gateways = dict(zip("ab", pair[:2]))
    info = saml_request(gateways[started], saml)
    form = {"SAMLResponse": base64.b64encode(saml.answer(info, BOB).encode()).decode()}
    bob = Browser()
    first = bob.http.post(f"{gateways[answered].approvals_url}/auth/saml/acs", data=form, allow_redirects=False,
                          timeout=30)
    assert first.status_code == 303, first.text
    assert bob.me(gateways[replayed]).json()["subject"] == "bob"
    again = requests.post(f"{gateways[replayed].approvals_url}/auth/saml/acs", data=form, allow_redirects=False,
                          timeout=30)
    assert refusal(again) == (400, "signin_failed", UNSOLICITED)


def test_a_slack_click_replayed_to_the_other_replica_is_refused(pair, people, slack, agents, upstream):
    a, b, _ = pair
    Browser().sign_in(start=b, finish=b)  # binds Slack's alice (by e-mail) to the approver alice
    held = agents.submit(send, a, people["buyer"], "/restock", {"tag": "slack-replay-across"})
    approval = pending_for(Approver(a.approvals_url, people["m1"]), "slack-replay-across")
    where = wait_for(lambda: len(found := slack.posted_for(approval["id"])) == len(CHANNELS) and found)
    body = slack.payload(*where[0], SLACK_ALICE, "approve", reason="once")
    headers = slack.sign(body, int(time.time()))
    first = slack.send(f"{a.approvals_url}/slack/interactions", body, headers)
    assert (first.status_code, first.json()["state"]) == (200, "approved"), first.text
    again = slack.send(f"{b.approvals_url}/slack/interactions", body, headers)
    assert refusal(again) == (401, "slack_unverified", "this signed request was seen already (replayed)")
    assert held.result(timeout=30).status_code == 200
    assert len(reached(upstream, "slack-replay-across")) == 1


# the store going away


def stranger_click(slack: SlackStandIn) -> tuple[bytes, dict[str, str]]:
    """A click Slack signed, by a Slack user bound to no approver (it votes nothing either way)."""
    document = {"type": "block_actions", "user": {"id": SLACK_STRANGER}, "team": {"id": slack.team},
                "container": {"channel_id": CHANNELS[0], "message_ts": "1.000001"},
                "actions": [{"action_id": "approve", "value": "no-such-approval"}]}
    body = urllib.parse.urlencode({"payload": json.dumps(document)}).encode()
    return body, slack.sign(body, int(time.time()))


def click(gw: Gateway, slack: SlackStandIn) -> requests.Response:
    """`stranger_click` sent to `gw`, waiting as long as a store that is down takes to say so
    (the reader thread's calls ahead of it each wait `store.timeout` for a connection)."""
    body, headers = stranger_click(slack)
    return requests.post(f"{gw.approvals_url}/slack/interactions", data=body, headers=headers, timeout=60)


def test_while_the_store_is_down_nobody_is_signed_in_and_it_heals(tmp_path, servers, idp, slack):
    own = PostgresServer(PASSWORD, log_statements=False)
    try:
        public = f"http://127.0.0.1:{free_port()}"
        gw = replica(tmp_path / "gw", servers, public, idp, slack, store=pg_store(database(own)))
        gw.start()
        wait_for(lambda: ready(gw), timeout=60)
        alice = Browser()
        alice.sign_in(start=gw, finish=gw)
        waiting = Browser()
        callback = waiting.at_idp(waiting.start(gw), ALICE)  # a sign-in in progress when the store goes
        own.execute("CHECKPOINT")  # on disk: this test server commits asynchronously, and halts as if it crashed
        own.halt()
        down = {
            "the page's session": alice.me(gw),
            "a listing with the cookie": alice.http.get(f"{gw.approvals_url}/approvals", timeout=30),
            "a sign-in starting": alice.http.get(f"{gw.approvals_url}/auth/oidc/login", allow_redirects=False,
                                                 timeout=30),
            "a sign-in finishing": waiting.finish(gw, callback),
            "a Slack click": click(gw, slack),
        }
        assert {name: (r.status_code, r.json()["error"]) for name, r in down.items()} == {
            name: (503, "audit_unavailable") for name in down}
        assert "custody_session" not in waiting.http.cookies
        own.start()
        # the same process, healed (as soon as the store's pool connects again: psycopg_pool
        # retries with a backoff that grew while the store was down)
        wait_for(lambda: alice.me(gw).status_code == 200, timeout=90)
        assert alice.me(gw).json()["signed_in"] is True  # the session outlived the outage, in the store
        finished = waiting.finish(gw, callback)  # the outage took nothing: the sign-in is still there, once
        assert finished.status_code == 303, finished.text
        assert waiting.me(gw).json()["subject"] == "alice"
        clicked = click(gw, slack)
        assert (clicked.status_code, clicked.json()["error"]) == (200, "unmapped_user")
        assert gw.proc.poll() is None
        gw.stop()
    finally:
        own.stop()


# workers on one port


def test_workers_on_one_port_share_sign_ins_and_sessions(tmp_path, servers, idp, slack):
    """`custody run --workers 2` on SQLite: every request on a connection of its own, so each
    step reaches whichever worker the kernel picks; every sign-in works and every session is
    known to both."""
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    gw = replica(tmp_path, servers, public, idp, slack, run_args=("--workers", "2"))  # SQLite
    gw.config["approvals"]["listen"] = f"127.0.0.1:{port}"
    gw.approvals_url = public
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.start()
    wait_for(lambda: ready(gw) and gw.log().count("masking worker(s) ready") == 2, timeout=90)  # both workers
    try:
        for _ in range(6):
            alice = Browser(fresh_connections=True)
            alice.sign_in(start=gw, finish=gw)
            assert [alice.me(gw).json()["signed_in"] for _ in range(6)] == [True] * 6
            csrf, kept = alice.me(gw).json()["csrf"], {"custody_session": alice.cookie()}
            assert alice.post(gw, "/auth/logout", csrf).json()["signed_in"] is False
            assert [requests.get(f"{public}/approvals", cookies=kept, timeout=30).status_code
                    for _ in range(6)] == [401] * 6
        store = gw.store()
        served = {r["replica"] for r in store.where("kind = 'request'", [])}  # all of it the approvals page's
        assert len(served) == 2  # both workers took part
    finally:
        gw.stop()
