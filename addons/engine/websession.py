"""Approvers' browser sessions: what an SSO sign-in leaves behind, kept on the server.

The browser holds only a random session id in an HttpOnly, SameSite=Strict cookie (Secure
when the page is served over TLS); the gateway keeps, by the id's SHA-256, who signed in,
how, a CSRF token, and when the session ends (`approvals.session_ttl`), so an expired or
signed-out cookie is worth nothing whatever the browser keeps. Changes (votes, revocations,
sign-out) need the CSRF token in a header as well as the cookie.

A sign-in in progress (OIDC) is bound to the browser that started it by a second cookie
(SameSite=Lax: it must come back on the identity provider's redirect), and each is used
once and lasts only PENDING_TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from addons.engine.errors import Error
from addons.engine.model import Principal

SESSION_COOKIE = "custody_session"
SIGNIN_COOKIE = "custody_signin"
CSRF_HEADER = "x-csrf-token"
PENDING_TTL = 600.0


def _key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def cookies(header: str) -> dict[str, str]:
    """A Cookie header's pairs (the first of a repeated name wins)."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name and name not in out:
            out[name] = value.strip().strip('"')
    return out


def set_cookie(name: str, value: str, *, max_age: int, secure: bool, same_site: str, path: str = "/") -> str:
    """A Set-Cookie value; an empty value with max_age 0 clears the cookie."""
    return (f"{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite={same_site}"
            + ("; Secure" if secure else ""))


@dataclass
class WebSession:
    principal: Principal
    method: str  # oidc | saml
    email: str
    csrf: str
    created: float
    expires: float

    def about(self) -> dict[str, Any]:
        """What the page may know about its own session (the CSRF token it must send back)."""
        return {"signed_in": True, "subject": self.principal.subject, "issuer": self.principal.issuer,
                "groups": list(self.principal.groups), "email": self.email, "method": self.method,
                "csrf": self.csrf, "expires": self.expires}


class SessionError(Exception):
    """A cookie that identifies nobody (expired, signed out, unknown), or a change without
    the session's CSRF token; `status` and `error` are the refusal's."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


@dataclass
class Pending:
    """An OIDC sign-in on its way through the identity provider."""

    state: str
    nonce: str
    verifier: str
    browser: str
    started: float


class Sessions:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.live: dict[str, WebSession] = {}
        self.pending: dict[str, Pending] = {}

    def start(self, principal: Principal, method: str, email: str, now: float | None = None) -> tuple[str, WebSession]:
        """A new session for `principal`: the cookie value and the session."""
        now = time.time() if now is None else now
        self._sweep(now)
        value = secrets.token_urlsafe(32)
        session = WebSession(principal, method, email, secrets.token_urlsafe(24), now, now + self.ttl)
        self.live[_key(value)] = session
        return value, session

    def find(self, value: str, now: float | None = None) -> WebSession:
        now = time.time() if now is None else now
        session = self.live.get(_key(value)) if value else None
        if session is None:
            raise SessionError(401, Error.UNAUTHENTICATED, "no such session: sign in again")
        if session.expires <= now:
            del self.live[_key(value)]
            raise SessionError(401, Error.UNAUTHENTICATED, "the session expired: sign in again")
        return session

    def end(self, value: str) -> None:
        self.live.pop(_key(value), None)

    @staticmethod
    def check_csrf(session: WebSession, sent: str) -> None:
        if not sent:
            raise SessionError(403, Error.CSRF_FAILED, f"a change needs the session's CSRF token in {CSRF_HEADER}")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise SessionError(403, Error.CSRF_FAILED, f"the {CSRF_HEADER} header does not match this session's token")

    # sign-ins in progress

    def begin(self, now: float | None = None) -> tuple[Pending, str]:
        """A new sign-in in progress, and the value of the cookie binding it to this browser."""
        now = time.time() if now is None else now
        self._sweep(now)
        browser = secrets.token_urlsafe(24)
        pending = Pending(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48),
                          _key(browser), now)
        self.pending[pending.state] = pending
        return pending, browser

    def resume(self, state: str, browser: str, now: float | None = None) -> Pending:
        """The sign-in `state` names, once, if this browser started it and it is recent."""
        now = time.time() if now is None else now
        pending = self.pending.pop(state, None) if state else None
        if pending is None or pending.started + PENDING_TTL <= now:
            raise SessionError(400, Error.SIGNIN_FAILED,
                               "state does not match any sign-in in progress (expired, used already, or forged)")
        if not browser or not hmac.compare_digest(_key(browser), pending.browser):
            raise SessionError(400, Error.SIGNIN_FAILED, "this browser did not start that sign-in")
        return pending

    def _sweep(self, now: float) -> None:
        for key in [k for k, s in self.live.items() if s.expires <= now]:
            del self.live[key]
        for state in [k for k, p in self.pending.items() if p.started + PENDING_TTL <= now]:
            del self.pending[state]
