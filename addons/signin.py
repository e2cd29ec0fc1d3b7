"""signin: approvers sign in to the approvals page with the organisation's identity
provider (OpenID Connect, or SAML 2.0), and stay signed in with a session cookie.

    GET  /auth/me                the page's session (with its CSRF token), or how to sign in
    GET  /auth/oidc/login        to the OIDC provider (code flow, PKCE S256, state, nonce)
    GET  /auth/oidc/callback     back from it: the code exchanged, the ID token verified
    GET  /auth/saml/login        to the SAML IdP (HTTP-Redirect AuthnRequest)
    POST /auth/saml/acs          back from it (HTTP-POST Response): signed assertion required
    GET  /auth/saml/metadata     this service provider's metadata
    POST /auth/logout            end the session (CSRF token required)

These are on the gateway's host, before identity (nobody has a token yet); every one is
recorded like any other request. A sign-in starts a server-side session
(addons/engine/websession.py) and records who signed in and as whom, with the IdP e-mail,
which later binds a Slack user to this approver (addons/slackapp.py). The identity addon
asks `principal()` for the session behind a cookie, so the approvals API identifies page
users without a bearer token; token sign-in stays for the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any

from mitmproxy import http

from addons import context, failclosed
from addons.auditlog import AuditLog
from addons.engine import oidc
from addons.engine.config import GATEWAY_CONNECTION, IdentityConfig
from addons.engine.errors import Error
from addons.engine.model import Decision, Principal, new_id
from addons.engine.saml import SamlError, ServiceProvider, in_response_to
from addons.engine.store import Event, Listing
from addons.engine.tokens import TokenError, Verifier
from addons.engine.websession import (
    CSRF_HEADER,
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    PENDING_TTL,
    SessionError,
    Sessions,
    cookies,
    set_cookie,
)
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Signin:
    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings = settings
        self.log = log
        self.host = ""
        self.secure_url = False
        self.sessions = Sessions(log, 8 * 3600.0)
        self.oidc: oidc.OidcClient | None = None
        self.verifier: Verifier | None = None
        self.saml: ServiceProvider | None = None
        self.methods: list[dict[str, str]] = []

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require()
        approvals = cfg.approvals
        self.host = cfg.gateway_host
        self.secure_url = approvals.public_url.startswith("https://")
        self.sessions.ttl = approvals.session_ttl
        self.methods = []
        self.oidc = self.verifier = self.saml = None
        if approvals.oidc is not None:
            self.oidc = oidc.OidcClient(approvals.oidc, f"{approvals.public_url}/auth/oidc/callback")
            self.verifier = Verifier(IdentityConfig(issuers=(approvals.oidc.issuer,), dev_issuer=None,
                                                    jwks_min_interval=cfg.identity.jwks_min_interval,
                                                    jwks_timeout=cfg.identity.jwks_timeout))
            self.methods.append({"id": "oidc", "label": approvals.oidc.label, "url": "/auth/oidc/login"})
        if approvals.saml is not None:
            try:
                self.saml = ServiceProvider(approvals.saml, approvals.public_url)
            except SamlError as e:
                self.settings.invalid(f"approvals.saml: {e}")
                return
            self.methods.append({"id": "saml", "label": approvals.saml.label, "url": "/auth/saml/login"})

    # what identity asks

    async def principal(self, headers: http.Headers, method: str) -> Principal | None:
        """The approver behind the request's session cookie (None: no cookie). Raises
        SessionError for a cookie that identifies nobody, a change without the CSRF token, or
        a store that cannot say (503)."""
        value = cookies(headers.get("cookie", "")).get(SESSION_COOKIE)
        if value is None:
            return None
        session = await self.sessions.find(value)
        if method not in SAFE_METHODS:
            self.sessions.check_csrf(session, headers.get(CSRF_HEADER, ""))
        return session.principal

    # the endpoints

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f) or f.request.host.lower() != self.host:
            return
        path, method = f.request.path.split("?", 1)[0], f.request.method
        route = ROUTES.get((method, path))
        if route is None:
            return  # not a sign-in endpoint: identity and the rest of the chain take it from here
        context.of(f).decision = Decision(effect="allow", reason="approvers' sign-in")
        try:
            await route(self, f)
        except (SessionError, oidc.OidcError, SamlError, TokenError) as e:
            status, error = (e.status, e.error) if isinstance(e, SessionError) else (400, Error.SIGNIN_FAILED)
            reason = f"ID token: {e}" if isinstance(e, TokenError) else str(e)
            failclosed.refuse(f, status, reason, error=error)

    def _secure(self, f: http.HTTPFlow) -> bool:
        return self.secure_url or f.request.scheme == "https"

    def _json(self, f: http.HTTPFlow, document: Any, *cookie: str) -> None:
        f.response = http.Response.make(200, json.dumps(document), {"content-type": "application/json",
                                                                    "cache-control": "no-store"})
        for c in cookie:
            f.response.headers.add("set-cookie", c)

    def _redirect(self, f: http.HTTPFlow, location: str, *cookie: str) -> None:
        f.response = http.Response.make(303, b"", {"location": location, "cache-control": "no-store"})
        for c in cookie:
            f.response.headers.add("set-cookie", c)

    async def me(self, f: http.HTTPFlow) -> None:
        value = cookies(f.request.headers.get("cookie", "")).get(SESSION_COOKIE, "")
        try:
            self._json(f, (await self.sessions.find(value)).about())
        except SessionError as e:
            if e.status != 401:
                raise  # the store cannot say: never "signed out" (nor signed in) on a guess
            self._json(f, {"signed_in": False, "methods": self.methods})

    async def logout(self, f: http.HTTPFlow) -> None:
        value = cookies(f.request.headers.get("cookie", "")).get(SESSION_COOKIE, "")
        self.sessions.check_csrf(await self.sessions.find(value), f.request.headers.get(CSRF_HEADER, ""))
        await self.sessions.end(value)
        self._json(f, {"signed_in": False, "methods": self.methods},
                   set_cookie(SESSION_COOKIE, "", max_age=0, secure=self._secure(f), same_site="Strict"))

    async def oidc_login(self, f: http.HTTPFlow) -> None:
        client = self._oidc()
        pending, browser = await self.sessions.begin()
        url = await asyncio.to_thread(client.authorization_url, pending)
        self._redirect(f, url, set_cookie(SIGNIN_COOKIE, browser, max_age=int(PENDING_TTL), secure=self._secure(f),
                                          same_site="Lax", path="/auth/"))

    async def oidc_callback(self, f: http.HTTPFlow) -> None:
        client = self._oidc()
        query = f.request.query
        if "error" in query:
            raise oidc.OidcError(f"the identity provider refused the sign-in: {query['error']}"
                                 + (f" ({query['error_description']})" if query.get("error_description") else ""))
        pending = await self.sessions.resume(query.get("state", ""),
                                             cookies(f.request.headers.get("cookie", "")).get(SIGNIN_COOKIE, ""))
        if not query.get("code"):
            raise oidc.OidcError("the identity provider sent no code")
        token = await asyncio.to_thread(client.exchange, pending, query["code"])
        principal, claims = await self.verifier.verify_claims(token["id_token"])
        oidc.check_claims(claims, pending, client.settings.client_id)
        source = claims
        if client.settings.groups_from == "userinfo":
            source = await asyncio.to_thread(client.userinfo, token)
            if source.get("sub") != claims.get("sub"):
                raise oidc.OidcError("userinfo is about another subject than the ID token")
        principal = Principal(principal.subject, principal.issuer, oidc.groups(source, client.settings.issuer.groups_claim),
                              token_fingerprint=principal.token_fingerprint)
        await self._signed_in(f, principal, "oidc", oidc.email(source) or oidc.email(claims),
                              set_cookie(SIGNIN_COOKIE, "", max_age=0, secure=self._secure(f), same_site="Lax",
                                         path="/auth/"))

    async def saml_login(self, f: http.HTTPFlow) -> None:
        url, request_id = self._saml().login_url()
        await self.sessions.begin_saml(request_id)
        self._redirect(f, url)

    async def saml_acs(self, f: http.HTTPFlow) -> None:
        sp = self._saml()
        form = urllib.parse.parse_qs((f.request.get_content(strict=False) or b"").decode(errors="replace"))
        response = (form.get("SAMLResponse") or [""])[0]
        outstanding = await self.sessions.outstanding_saml(in_response_to(response))
        who = await asyncio.to_thread(sp.accept, response, outstanding)
        await self.sessions.answered_saml(who.request)
        await self._signed_in(f, who.principal, "saml", who.email)

    async def saml_metadata(self, f: http.HTTPFlow) -> None:
        f.response = http.Response.make(200, self._saml().metadata(), {"content-type": "application/samlmetadata+xml"})

    async def _signed_in(self, f: http.HTTPFlow, principal: Principal, method: str, email: str, *cookie: str) -> None:
        """Record the sign-in with its session (and, with an e-mail, the identity it binds), in
        one transaction: a sign-in that is not on record starts no session."""
        value, session = self.sessions.start(principal, method, email)
        event = Event(id=new_id(), kind="signin", session=context.of(f).session, flow=f.id, principal=principal,
                      connection=GATEWAY_CONNECTION,
                      detail={"method": method, "email": email, "session_expires": session.expires})
        listing = [Listing(email, principal.subject, principal.issuer, principal.groups, method)] if email else []
        try:
            await self.log.write([event], [session, *listing])
        except Exception as e:
            raise SessionError(503, Error.AUDIT_UNAVAILABLE, f"the sign-in could not be recorded, so it did not "
                                                             f"happen: {type(e).__name__}: {e}") from None
        self._redirect(f, "/", set_cookie(SESSION_COOKIE, value, max_age=int(self.sessions.ttl),
                                          secure=self._secure(f), same_site="Strict"), *cookie)

    def _oidc(self) -> oidc.OidcClient:
        if self.oidc is None:
            raise oidc.OidcError("OIDC sign-in is not configured (approvals.oidc)")
        return self.oidc

    def _saml(self) -> ServiceProvider:
        if self.saml is None:
            raise SamlError("SAML sign-in is not configured (approvals.saml)")
        return self.saml


ROUTES = {
    ("GET", "/auth/me"): Signin.me,
    ("POST", "/auth/logout"): Signin.logout,
    ("GET", "/auth/oidc/login"): Signin.oidc_login,
    ("GET", "/auth/oidc/callback"): Signin.oidc_callback,
    ("GET", "/auth/saml/login"): Signin.saml_login,
    ("POST", "/auth/saml/acs"): Signin.saml_acs,
    ("GET", "/auth/saml/metadata"): Signin.saml_metadata,
}

