"""Where people act on held requests: the approvals page in a real headless Chromium, and
mitmweb's own intercept controls (resume approves as the console operator, kill denies)."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.support.approvals import (
    Approver,
    make_gateway,
    pending_for,
    send,
    start,
)
from tests.support.approvers import agents, browser  # noqa: F401  (fixtures)
from tests.support.mitmweb import Mitmweb
from tests.support.servers import free_port


@pytest.fixture(scope="module")
def gw(tmp_path_factory, servers):
    gateway = start(make_gateway(tmp_path_factory.mktemp("ui"), servers))
    yield gateway
    gateway.stop()


def test_an_approver_signs_in_and_approves_in_the_browser(gw, browser, agents, token, upstream):
    hostile = "<img src=x onerror=document.title='owned'>"
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock",
                         {"item": 3, "quantity": 250, "note": hostile}, **{"X-Custody-Model": "gpt-4o"})
    page = browser.new_page()
    page.goto(gw.approvals_url + "/")
    page.fill("#token", token(sub="manager-1", groups=["managers"]))
    page.click("#login")
    expect(page.locator("#who")).to_have_text("signed in as manager-1")
    row = page.locator("#list tr.item", has_text="POST /restock on api")
    expect(row).to_be_visible(timeout=10000)  # the list updates without a reload
    row.click()
    expect(page.locator("#d-summary")).to_have_text("POST /restock on api")
    expect(page.locator("#d-requester")).to_have_text("crew-buyer (buyers)")
    expect(page.locator("#d-agent")).to_have_text("-")  # nothing verified: the token carries no agent claims
    expect(page.locator("#d-asserted")).to_have_text("model: gpt-4o")  # what the agent says, labelled unverified
    expect(row).to_contain_text('"quantity": 250')  # the list shows what tells this request from others
    expect(page.locator("#d-held")).to_contain_text("(in ")  # the hold's own timeout, not only the lifetime
    expect(page.locator("#d-why")).to_have_text("one-manager: restocking needs a manager")
    expect(page.locator("#d-body")).to_contain_text(hostile)  # shown as text, never as markup
    assert page.locator("#d-body img").count() == 0 and page.title() == "Custody approvals"
    assert not held.done()
    page.fill("#reason", "stock is low")
    page.click("#approve")
    expect(page.locator("#status")).to_contain_text("Recorded: approval is approved — approved by manager-1: stock is low")
    r = held.result(timeout=10)
    assert r.status_code == 200 and r.json()["path"] == "/restock"
    assert sum(b"onerror" in g.body for g in upstream.received) == 1
    expect(page.locator("#vote")).to_be_hidden()
    page.close()


def test_the_browser_shows_why_a_vote_is_refused(gw, browser, agents, token):
    requester = token(sub="crew-lead", groups=["managers"])
    held = agents.submit(send, gw, requester, "/restock", {"item": 9, "quantity": 1})
    pending_for(Approver(gw.approvals_url, token(sub="manager-2", groups=["managers"])), '"item": 9')
    page = browser.new_page()
    page.goto(gw.approvals_url + "/")
    page.fill("#token", requester)
    page.click("#login")
    page.locator("#list tr.item", has_text="crew-lead").click()
    page.click("#deny")
    expect(page.locator("#status")).to_have_text("A denial needs a reason.")
    page.click("#approve")
    expect(page.locator("#status")).to_have_text("the requester cannot approve or deny their own request")
    Approver(gw.approvals_url, token(sub="manager-2", groups=["managers"])).vote(
        pending_for(Approver(gw.approvals_url, token(sub="manager-2", groups=["managers"])), '"item": 9')["id"],
        "deny", "cleanup")
    assert held.result(timeout=10).status_code == 403
    page.close()


def test_a_refused_token_signs_the_page_out(gw, browser):
    page = browser.new_page()
    page.goto(gw.approvals_url + "/")
    page.fill("#token", "not-a-token")
    page.click("#login")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#who")).to_have_text("Your token was refused: malformed token")
    page.close()


# mitmweb


@pytest.fixture(scope="module")
def web(tmp_path_factory, servers):
    port = free_port()
    gateway = make_gateway(tmp_path_factory.mktemp("mitmweb"), servers, runner="mitmweb",
                           options=(f"web_port={port}", "web_open_browser=false", "web_password=s3cret"))
    start(gateway)
    yield gateway, Mitmweb(port, "s3cret")
    gateway.stop()


def test_mitmweb_shows_a_held_flow_and_resuming_approves_it_as_the_console_operator(web, agents, token, upstream):
    gw, mitmweb = web
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "mitmweb-resume"})
    flow = mitmweb.held("/restock")
    manager = Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))
    approval = pending_for(manager, "mitmweb-resume")
    assert flow["comment"] == f"custody: held for review · rules one-manager · approval {approval['id']}"
    assert flow["marked"] == "⚠"  # a symbol text fonts have: servers rarely have an emoji font
    mitmweb.post(f"/flows/{flow['id']}/resume")
    assert held.result(timeout=10).status_code == 200
    done = manager.show(approval["id"])
    assert done["state"] == "executed"
    assert [(v["approver"], v["via"]) for v in done["votes"]] == [("console-operator", "console")]
    approved = [e for e in done["timeline"] if e["detail"].get("step") == "approved"][0]
    assert approved["subject"] == "console-operator" and approved["reason"] == "approved by console-operator: resumed in the mitmproxy console"
    assert any(b"mitmweb-resume" in g.body for g in upstream.received)


def test_killing_a_held_flow_in_mitmweb_denies_it(web, agents, token, upstream):
    gw, mitmweb = web
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock", {"tag": "mitmweb-kill"})
    flow = mitmweb.held("/restock")
    mitmweb.post(f"/flows/{flow['id']}/kill")
    r = held.result(timeout=10)  # answered, not left hanging
    assert r.status_code == 403
    assert r.json()["error"] == "approval_denied"
    assert r.json()["reason"] == "denied by console-operator: killed in the mitmproxy console"
    assert not any(b"mitmweb-kill" in g.body for g in upstream.received)


def test_a_request_edited_while_held_is_not_sent(web, agents, token, upstream):
    gw, mitmweb = web
    held = agents.submit(send, gw, token(sub="crew-buyer", groups=["buyers"]), "/restock",
                         {"tag": "mitmweb-edit", "quantity": 1})
    flow = mitmweb.held("/restock")
    mitmweb.put(f"/flows/{flow['id']}", {"request": {"content": '{"tag": "mitmweb-edit", "quantity": 100000}'}})
    manager = Approver(gw.approvals_url, token(sub="manager-1", groups=["managers"]))
    approval = pending_for(manager, "mitmweb-edit")
    manager.vote(approval["id"], "approve", "the original was fine")
    r = held.result(timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "approval_mismatch"
    assert not any(b"mitmweb-edit" in g.body for g in upstream.received)


@pytest.mark.parametrize("decision", ["allow", "review", "deny", "approved"])
def test_decision_markers_render_in_a_text_font(decision):
    """mitmweb turns a marker shortcode into its character; each of Custody's must be one a
    plain text font (DejaVu Sans, Debian's default) has, not an emoji-only glyph."""
    import subprocess

    from mitmproxy.utils import emoji

    from addons.engine.model import MARKERS

    char = emoji.emoji[MARKERS[decision]]
    fonts = subprocess.run(["fc-list", f":charset={ord(char):x}", "family"], capture_output=True, text=True).stdout
    assert "DejaVu Sans" in fonts, f"{MARKERS[decision]} ({char}) needs an emoji font"
