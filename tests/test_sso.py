"""Approvers sign in with the organisation's IdP: OIDC (code flow, PKCE, state, nonce) and
SAML 2.0 driven by real Chromium against real providers (Authlib, pysaml2), a session
cookie the gateway keeps the truth of, CSRF on changes, `custody login` for the CLI — and
every bad input refused with what was wrong, and no session made of it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from playwright.sync_api import expect

from tests.support.approvals import Approver, make_gateway, pending_for, send, wait_for
from tests.support.approvers import (  # noqa: F401  (fixtures)
    ALICE,
    BOB,
    DAVE,
    Browserless,
    agents,
    approvers_gateway,
    browser,
    id_token,
    query,
    sign_in_page,
    with_query,
)
from tests.support.gateway import BIN
from tests.support.oidc import Provider
from tests.support.saml import IdentityProvider
from tests.support.slack import SlackStandIn


@pytest.fixture(scope="module")
def idp():
    op = Provider([ALICE, DAVE])
    yield op
    op.stop()


@pytest.fixture(scope="module")
def saml(tmp_path_factory):
    provider = IdentityProvider(tmp_path_factory.mktemp("saml-idp"), [BOB])
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def slack():
    api = SlackStandIn("xoxb-custody-test", "slack-signing-secret-9f2")
    yield api
    api.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers, idp, saml, slack):
    gateway = approvers_gateway(tmp_path_factory.mktemp("sso"), servers, idp, saml, slack)
    yield gateway
    gateway.stop()


@pytest.fixture(autouse=True)
def well_behaved(idp):
    yield
    idp.id_token_ttl, idp.nonce_override, idp.groups_in_id_token, idp.userinfo_groups = 300, None, True, None


def reached(upstream, marker: str) -> list:
    return [g for g in upstream.received if marker.encode() in g.body]


def test_an_approver_signs_in_with_oidc_in_the_browser_and_approves(gw, browser, agents, token, upstream):
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "sso-approve"})
    context, page = sign_in_page(browser, gw, ALICE, "oidc")
    cookie = next(c for c in context.cookies() if c["name"] == "custody_session")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"], cookie["path"]) == (True, "Strict", False, "/")
    assert page.evaluate("document.cookie") == ""  # the page's script never sees the session
    row = page.locator("#list tr.item", has_text="POST /restock on api")
    expect(row).to_be_visible(timeout=10000)
    row.click()
    page.fill("#reason", "signed in with SSO")
    page.click("#approve")
    expect(page.locator("#status")).to_contain_text("approved by alice: signed in with SSO")
    assert held.result(timeout=10).status_code == 200 and len(reached(upstream, "sso-approve")) == 1
    signin = gw.events("kind = 'signin' AND subject = 'alice'")
    assert signin and json.loads(signin[-1]["detail"])["email"] == "alice@example.com"
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert requests.get(f"{gw.approvals_url}/approvals", cookies={"custody_session": cookie["value"]},
                        timeout=10).json()["error"] == "unauthenticated"  # ended on the server, not just forgotten
    context.close()


def test_the_page_updates_live_and_filters_to_what_the_approver_can_decide(gw, browser, agents, token, idp):
    context, page = sign_in_page(browser, gw, ALICE, "oidc")
    page.check("#mine")
    theirs = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "live-theirs"})
    own = agents.submit(send, gw, id_token(idp, ALICE), "/restock", {"tag": "live-own"})  # alice's own agent
    expect(page.locator("#list tr.item", has_text="live-theirs")).to_be_visible(timeout=10000)  # pushed, not polled
    expect(page.locator("#list tr.item", has_text="live-own")).to_have_count(0)  # hers: not hers to decide
    page.uncheck("#mine")
    expect(page.locator("#list tr.item", has_text="live-own")).to_be_visible()
    manager = Approver(gw.approvals_url, token(sub="manager-9", groups=["managers"]))
    for tag in ("live-theirs", "live-own"):
        manager.vote(pending_for(manager, tag)["id"], "deny", "cleanup")
    expect(page.locator("#list tr.item", has_text="live-theirs")).to_have_count(0)  # decided: gone from pending
    assert theirs.result(timeout=10).status_code == own.result(timeout=10).status_code == 403
    context.close()


def test_a_link_to_an_approval_leads_there_after_signing_in(gw, browser, agents, token):
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "deep-link"})
    manager = Approver(gw.approvals_url, token(sub="manager-9", groups=["managers"]))
    approval = pending_for(manager, "deep-link")
    context, page = sign_in_page(browser, gw, ALICE, "oidc", link=f"/#/approvals/{approval['id']}")  # Slack's Details
    expect(page.locator("#d-body")).to_contain_text("deep-link")
    manager.vote(approval["id"], "deny", "cleanup")
    assert held.result(timeout=10).status_code == 403
    context.close()


@pytest.mark.parametrize("name, tamper, reason", [
    ("state mismatch", lambda run, callback: run.finish(with_query(callback, state="forged-state")),
     "state does not match any sign-in in progress"),
    ("no sign-in cookie (another browser)", lambda run, callback: Browserless(run.gw).finish(callback),
     "this browser did not start that sign-in"),
    ("callback replayed", lambda run, callback: (run.finish(callback), run.forget(), run.finish(callback))[-1],
     "state does not match any sign-in in progress"),
    ("code injected from another sign-in (PKCE verifier wrong)",
     lambda run, callback: run.finish(with_query(callback, state=query(run.start())["state"])),
     "the identity provider refused the code: invalid_grant"),
    ("provider error", lambda run, callback: run.finish(with_query(callback, error="access_denied")),
     "the identity provider refused the sign-in: access_denied"),
])
def test_oidc_callbacks_that_must_not_sign_anyone_in(gw, idp, name, tamper, reason):
    run = Browserless(gw)
    callback = run.at_idp(run.start(), ALICE)
    answer = tamper(run, callback)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error"] == "signin_failed" and reason in body["reason"]
    assert "custody_session" not in answer.headers.get("set-cookie", "")
    assert run.me()["signed_in"] is False


@pytest.mark.parametrize("name, knob, reason", [
    ("expired ID token", {"id_token_ttl": -120}, "ID token: token expired"),
    ("nonce of an earlier sign-in (replay)", {"nonce_override": "nonce-of-yesterday"},
     "the ID token's nonce is not this sign-in's"),
])
def test_id_tokens_that_must_not_sign_anyone_in(gw, idp, name, knob, reason):
    for attribute, value in knob.items():
        setattr(idp, attribute, value)
    run = Browserless(gw)
    answer = run.finish(run.at_idp(run.start(), ALICE))
    assert (answer.status_code, answer.json()["error"]) == (400, "signin_failed")
    assert reason in answer.json()["reason"]
    assert run.me()["signed_in"] is False


def test_groups_can_come_from_userinfo(tmp_path, servers, idp, saml, slack, token):
    gw = approvers_gateway(tmp_path, servers, idp, saml, slack,
                           oidc={"issuer": idp.issuer, "client_id": "custody-approvals",
                                 "client_secret": "env:OIDC_CLIENT_SECRET", "groups_from": "userinfo"})
    try:
        idp.groups_in_id_token, idp.userinfo_groups = False, ["managers", "auditors"]
        me = Browserless(gw).sign_in(ALICE)
        assert me["groups"] == ["managers", "auditors"]
    finally:
        gw.stop()


def test_votes_need_the_sessions_csrf_token(gw, agents, token, upstream):
    run = Browserless(gw)
    me = run.sign_in(ALICE)
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "csrf"})
    approval = pending_for(Approver(gw.approvals_url, token(sub="manager-2", groups=["managers"])), "csrf")
    for csrf, reason in ((None, "a change needs the session's CSRF token"), ("wrong", "does not match this session")):
        refused = run.vote(approval["id"], "approve", csrf)
        assert (refused.status_code, refused.json()["error"]) == (403, "csrf_failed")
        assert reason in refused.json()["reason"]
    assert run.http.get(f"{gw.approvals_url}/approvals/{approval['id']}").json()["votes"] == []
    assert not held.done() and reached(upstream, '"csrf"') == []
    assert run.vote(approval["id"], "approve", me["csrf"]).json()["state"] == "approved"
    assert held.result(timeout=10).status_code == 200
    out = run.http.post(f"{gw.approvals_url}/auth/logout", timeout=10)
    assert (out.status_code, out.json()["error"]) == (403, "csrf_failed")


def test_an_expired_session_identifies_nobody(tmp_path, servers, idp, saml, slack):
    gw = approvers_gateway(tmp_path, servers, idp, saml, slack, session_ttl="1s")
    try:
        run = Browserless(gw)
        assert run.sign_in(ALICE)["signed_in"] is True
        kept = {"custody_session": run.http.cookies["custody_session"]}  # a client that ignores Max-Age (or stole it)

        def listing():
            return requests.get(f"{gw.approvals_url}/approvals", cookies=kept, timeout=10)

        assert listing().status_code == 200
        answer = wait_for(lambda: (r := listing()).status_code == 401 and [r], timeout=10)[0]  # a 401 is falsy
        assert answer.json()["error"] == "unauthenticated" and answer.json()["reason"] == "the session expired: sign in again"
        assert listing().json()["reason"] == "no such session: sign in again"  # and it is gone for good
    finally:
        gw.stop()


# SAML


def test_an_approver_signs_in_with_saml_in_the_browser(gw, browser, saml):
    context, page = sign_in_page(browser, gw, BOB, "saml")
    me = page.evaluate("fetch('/auth/me').then((r) => r.json())")
    assert (me["issuer"], me["groups"], me["email"]) == (saml.entity_id, ["managers"], "bob@example.com")
    context.close()


def saml_request(gw, saml) -> dict:
    """A sign-in this gateway started: the AuthnRequest as the IdP received it."""
    requests.get(requests.get(f"{gw.approvals_url}/auth/saml/login", allow_redirects=False, timeout=10)
                 .headers["location"], timeout=10).raise_for_status()
    return saml.requests[-1]


@pytest.mark.parametrize("name, answer, reason", [
    ("unsigned assertion", lambda saml, info: saml.answer(info, BOB, sign=False),
     "the assertion is not signed by the identity provider's key"),
    ("altered after signing", lambda saml, info: saml.answer(info, BOB).replace(">managers<", ">admins<"),
     "the assertion is not signed by the identity provider's key"),
    ("another audience", lambda saml, info: saml.answer(info, BOB, audience="urn:test:another-service-provider"),
     "the assertion's audience is not this service provider"),
    ("another recipient", lambda saml, info: saml.answer(info, BOB, recipient="http://127.0.0.1:1/auth/saml/acs"),
     "recipient is not this service provider's ACS URL"),
    ("expired assertion", lambda saml, info: saml.answer(info, BOB, expired=True), "the assertion has expired"),
    ("unsolicited", lambda saml, info: saml.answer(info, BOB, in_response_to="id-never-sent"),
     "answers no sign-in this gateway started"),
])
def test_saml_responses_that_must_not_sign_anyone_in(gw, saml, name, answer, reason):
    xml = answer(saml, saml_request(gw, saml))
    http = requests.Session()
    reply = http.post(f"{gw.approvals_url}/auth/saml/acs",
                      data={"SAMLResponse": base64.b64encode(xml.encode()).decode()}, allow_redirects=False, timeout=30)
    assert (reply.status_code, reply.json()["error"]) == (400, "signin_failed")
    assert reason in reply.json()["reason"]
    assert http.get(f"{gw.approvals_url}/auth/me", timeout=10).json()["signed_in"] is False


def test_a_saml_response_is_used_once(gw, saml):
    info = saml_request(gw, saml)
    form = {"SAMLResponse": base64.b64encode(saml.answer(info, BOB).encode()).decode()}
    first = requests.post(f"{gw.approvals_url}/auth/saml/acs", data=form, allow_redirects=False, timeout=30)
    assert first.status_code == 303 and "custody_session=" in first.headers["set-cookie"]
    again = requests.post(f"{gw.approvals_url}/auth/saml/acs", data=form, allow_redirects=False, timeout=30)
    assert again.status_code == 400 and "answers no sign-in this gateway started" in again.json()["reason"]


# the CLI


def test_custody_login_gets_an_approvers_token_with_the_device_grant(gw, browser, agents, token, tmp_path, upstream):
    env = {**gw.env, "CUSTODY_CONFIG": str(gw.config_file), "CUSTODY_APPROVER_TOKEN_FILE": str(tmp_path / "token"),
           "CUSTODY_APPROVALS_URL": gw.approvals_url}
    env.pop("CUSTODY_APPROVER_TOKEN", None)
    login = subprocess.Popen([str(BIN / "custody"), "login"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    link = login.stdout.readline().split("open ", 1)[1].strip()
    assert "user_code=" in link
    page = browser.new_page()
    page.goto(link)
    page.fill("#username", ALICE.username)
    page.fill("#password", ALICE.password)
    page.click("#submit")
    expect(page.locator("#done")).to_be_visible()
    page.close()
    assert login.wait(60) == 0, login.stderr.read()
    assert oct(os.stat(tmp_path / "token").st_mode & 0o777) == "0o600"
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "cli-login"})
    approval = pending_for(Approver(gw.approvals_url, token(sub="manager-3", groups=["managers"])), "cli-login")
    voted = subprocess.run([str(BIN / "custody"), "approvals", "approve", approval["id"], "--reason", "from the CLI"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert voted.returncode == 0, voted.stderr
    assert voted.stdout.strip() == f"{approval['id']}: approved (approved by alice: from the CLI)"
    assert held.result(timeout=10).status_code == 200 and len(reached(upstream, "cli-login")) == 1


def test_custody_login_without_an_idp_says_so(tmp_path, servers):
    gw = make_gateway(tmp_path, servers)
    out = subprocess.run([str(BIN / "custody"), "login", "--config", str(gw.config_file)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip() == "approvals.oidc is not configured: there is no identity provider to sign in with"


def test_the_inbox_streams_changes_and_the_cli_watches_it(gw, agents, token):
    manager = token(sub="manager-4", groups=["managers"])
    url = f"{gw.approvals_url}/approvals/events"
    ready = requests.get(url, headers={"authorization": f"Bearer {manager}"}, timeout=10)
    assert ready.headers["content-type"] == "text/event-stream" and "event: ready" in ready.text
    last = [line[4:] for line in ready.text.splitlines() if line.startswith("id: ")][-1]
    env = {**gw.env, "CUSTODY_CONFIG": str(gw.config_file), "CUSTODY_APPROVER_TOKEN": manager,
           "CUSTODY_APPROVALS_URL": gw.approvals_url}
    watch = subprocess.Popen([str(BIN / "custody"), "approvals", "watch", "--actionable"], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            waiting = pool.submit(requests.get, url, headers={"authorization": f"Bearer {manager}",
                                                              "last-event-id": last}, timeout=40)
            time.sleep(0.5)  # the inbox request is waiting for a change
            held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "inbox"})
            stream = waiting.result(timeout=40).text
        event = json.loads(next(line[6:] for line in stream.splitlines() if line.startswith("data: {\"id\"")))
        assert (event["state"], event["requester"], event["actionable"]) == ("pending", "crew-buyer", True)
        line = watch.stdout.readline()  # the pending approval, listed or pushed
        assert event["id"] in line and "pending" in line and "can decide" in line
        analyst = requests.get(url, headers={"authorization": f"Bearer {token(sub='analyst-5', groups=['analysts'])}",
                                             "last-event-id": last}, params={"actionable": "1"}, timeout=40).text
        assert event["id"] not in analyst  # not theirs to decide: not in their inbox
        Approver(gw.approvals_url, manager).vote(event["id"], "deny", "inbox test")
        assert held.result(timeout=10).status_code == 403
        lines = iter(watch.stdout.readline, "")
        assert any(event["id"] in line and "denied" in line for line in lines)
    finally:
        watch.terminate()
        watch.wait(10)
