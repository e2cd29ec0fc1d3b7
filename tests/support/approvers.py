"""What the approvers' tests share: the people at the test IdPs, a gateway that signs
approvers in with OIDC and SAML and posts to Slack, and the steps of a sign-in done with
plain HTTP (for the tables of bad inputs; the browser does the real thing)."""

from __future__ import annotations

import shutil
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from playwright.sync_api import expect, sync_playwright

from tests.conftest import standard_identity
from tests.support.approvals import REVIEW_RULES, make_gateway, start
from tests.support.gateway import Gateway
from tests.support.oidc import Provider, User
from tests.support.saml import IdentityProvider
from tests.support.slack import SlackStandIn

ALICE = User("alice", "alice-pw", "alice@example.com", ["managers"])
CAROL = User("carol", "carol-pw", "carol@example.com", ["managers", "buyers"])
DAVE = User("dave", "dave-pw", "dave@example.com", ["analysts"])
BOB = User("bob", "bob-pw", "bob@example.com", ["managers"])  # at the SAML IdP
BOT_TOKEN, SIGNING_SECRET, CHANNELS = "xoxb-custody-test", "slack-signing-secret-9f2", ["C0OPS", "C0SEC"]
SLACK_ALICE, SLACK_CAROL, SLACK_STRANGER = "U0ALICE", "U0CAROL", "U0NOBODY"

RULES = {
    **REVIEW_RULES,
    "approvers.yaml": {"rules": [
        {"id": "justified-refunds", "match": {"connection": "api", "method": "POST", "path": "/refund-requests"},
         "effect": "review", "reason": "refund requests need a manager and a reason",
         "review": {"approvers": ["group:managers"], "timeout": "30s", "require_justification": True}},
        {"id": "grantable-stock", "match": {"connection": "api", "method": "POST", "path": "/stock/*"},
         "effect": "review", "reason": "stock changes need a manager",
         "review": {"approvers": ["group:managers"], "timeout": "30s", "grants": {"max": "15m"}}},
        {"id": "brief-grants", "match": {"connection": "api", "method": "POST", "path": "/brief/*"},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "30s", "grants": {"max": "2s"}}},
        {"id": "slack-expiring", "match": {"connection": "api", "method": "POST", "path": "/fleeting"},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "1s", "ttl": "2s"}},
    ]},
}


def approvers_gateway(directory, servers, idp: Provider, saml: IdentityProvider, slack: SlackStandIn,
                      **approvals) -> Gateway:
    identity = standard_identity(servers.jwks)
    identity["issuers"].append({"issuer": idp.issuer, "audience": "custody-approvals", "discovery": True, "leeway": 5})
    gw = make_gateway(directory, servers, rules=RULES, identity=identity, approvals={
        "oidc": {"issuer": idp.issuer, "client_id": "custody-approvals", "client_secret": "env:OIDC_CLIENT_SECRET"},
        "saml": {"idp_metadata": str(saml.metadata_file)},
        "slack": {"bot_token": "env:SLACK_BOT_TOKEN", "signing_secret": "file:slack-signing-secret",
                  "channels": CHANNELS, "api_url": slack.api_url, "users": {SLACK_CAROL: CAROL.email}},
        **approvals,
    }, env={"OIDC_CLIENT_SECRET": idp.client.client_secret, "SLACK_BOT_TOKEN": BOT_TOKEN})
    (directory / "slack-signing-secret").write_text(SIGNING_SECRET + "\n")
    idp.client.redirect_uris.append(f"{gw.approvals_url}/auth/oidc/callback")
    start(gw)
    saml.trust(requests.get(f"{gw.approvals_url}/auth/saml/metadata", timeout=10).content)
    return gw


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def agents():
    """Agents whose requests are held while the test acts as an approver."""
    pool = ThreadPoolExecutor(max_workers=4)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


def sign_in_page(browser, gw: Gateway, user: User, method: str, link: str = "/"):
    """A browser context whose page, opened at `link`, is signed in with `method` (oidc, saml)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(gw.approvals_url + link)
    page.click(f"#sso-{method}")
    expect(page.locator("h1")).to_have_text("Test IdP")  # at the provider, not a page of ours
    page.fill("#username", user.username)
    page.fill("#password", user.password)
    page.click("#submit")  # OIDC: redirected back with a code; SAML: a form posts the signed response
    expect(page.locator("#who")).to_have_text(f"signed in as {user.username} ({method})")
    return context, page


def location(response: requests.Response) -> str:
    assert response.status_code in (302, 303), (response.status_code, response.text[:300])
    return response.headers["location"]


class Browserless:
    """An approver's sign-in, step by step, with plain HTTP and a cookie jar."""

    def __init__(self, gw: Gateway) -> None:
        self.gw, self.http = gw, requests.Session()
        self.http.trust_env = False

    def start(self) -> str:
        """GET /auth/oidc/login: the provider's authorization URL (this browser now holds the sign-in cookie)."""
        return location(self.http.get(f"{self.gw.approvals_url}/auth/oidc/login", allow_redirects=False, timeout=10))

    @staticmethod
    def at_idp(authorize: str, user: User) -> str:
        """The user signs in at the provider: the callback URL it redirects to."""
        return location(requests.post(authorize, data={"username": user.username, "password": user.password},
                                      allow_redirects=False, timeout=10))

    def finish(self, callback: str) -> requests.Response:
        return self.http.get(callback, allow_redirects=False, timeout=30)

    def sign_in(self, user: User) -> dict:
        answer = self.finish(self.at_idp(self.start(), user))
        assert answer.status_code == 303, answer.text
        return self.me()

    def forget(self) -> None:
        """Drop the session cookie here (the session itself lives on at the gateway)."""
        self.http.cookies.set("custody_session", None)

    def me(self) -> dict:
        return self.http.get(f"{self.gw.approvals_url}/auth/me", timeout=10).json()

    def vote(self, approval_id: str, action: str, csrf: str | None, **body) -> requests.Response:
        headers = {"x-csrf-token": csrf} if csrf is not None else {}
        return self.http.post(f"{self.gw.approvals_url}/approvals/{approval_id}/{action}", json=body,
                              headers=headers, timeout=10)


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).items()}


def with_query(url: str, **changes: str) -> str:
    parts = urllib.parse.urlsplit(url)
    q = {**query(url), **changes}
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def id_token(idp: Provider, user: User) -> str:
    """An ID token for `user` straight from the provider (device grant), as `custody login` gets one."""
    device = requests.post(f"{idp.issuer}/device_authorization",
                           data={"client_id": idp.client.client_id, "scope": "openid email groups"}, timeout=10).json()
    requests.post(device["verification_uri_complete"], data={"username": user.username, "password": user.password},
                  timeout=10).raise_for_status()
    answer = requests.post(f"{idp.issuer}/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                                                        "device_code": device["device_code"],
                                                        "client_id": idp.client.client_id}, timeout=10).json()
    return answer["id_token"]
