"""Approvers' browser sessions: what an SSO sign-in leaves behind, kept on the server.

The browser holds only a random session id in an HttpOnly, SameSite=Strict cookie (Secure
when the page is served over TLS); the audit store keeps, by the id's SHA-256 (never the id
itself), who signed in, how, a CSRF token, and when the session ends
(`approvals.session_ttl`), so an expired or signed-out cookie is worth nothing whatever the
browser keeps, on every replica. Changes (votes, revocations, sign-out) need the CSRF token
in a header as well as the cookie.

A sign-in in progress (OIDC) is kept in the store by its state, bound to the browser that
started it by a second cookie (SameSite=Lax: it must come back on the identity provider's
redirect; the store has only its hash); each is taken from the store once, by one
statement, and lasts only PENDING_TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from addons.engine.errors import Error
from addons.engine.model import Principal
from addons.engine.saml import REQUEST_TTL, UNSOLICITED
from addons.engine.store import SessionRow

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


class Reading(Protocol):
    """The audit log as sessions use it (addons/auditlog.py AuditLog): its reader store, and
    `call` to run one of the reader's methods off the event loop."""

    reader: Any

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any: ...


def principal_of(document: dict[str, Any]) -> Principal:
    """A Principal as `Principal.as_dict` wrote it."""
    return Principal(document["subject"], document["issuer"], tuple(document["groups"]), document["agent"],
                     document["asserted"], document["token_id"], document["token_fingerprint"])


class Sessions:
    """Sessions and sign-ins in progress, kept in the audit store so that every replica (and
    every worker of `custody run --workers`) serves every step of them: each store call runs
    on the audit log's reader thread, and a store that cannot answer refuses (503
    `audit_unavailable`): nobody is signed in by a store that did not say so."""

    def __init__(self, log: Reading, ttl: float) -> None:
        self.log = log
        self.ttl = ttl

    async def _store(self, fn: str, *args: Any) -> Any:
        try:
            return await self.log.call(getattr(self.log.reader, fn), *args)
        except Exception as e:
            raise SessionError(503, Error.AUDIT_UNAVAILABLE,
                               f"the audit store, which keeps approvers' sessions, cannot be used: {e}") from None

    def start(self, principal: Principal, method: str, email: str, now: float | None = None) -> tuple[str, SessionRow]:
        """A new session for `principal`: the cookie value, and the row to keep in the
        transaction that records the sign-in."""
        now = time.time() if now is None else now
        value = secrets.token_urlsafe(32)
        return value, SessionRow(_key(value), principal, method, email, secrets.token_urlsafe(24), now, now + self.ttl)

    async def find(self, value: str, now: float | None = None) -> WebSession:
        now = time.time() if now is None else now
        row = await self._store("web_session", _key(value)) if value else None
        if row is None:
            raise SessionError(401, Error.UNAUTHENTICATED, "no such session: sign in again")
        if row["expires"] <= now:
            await self._store("end_web_session", row["key"])  # found expired: gone for every replica
            raise SessionError(401, Error.UNAUTHENTICATED, "the session expired: sign in again")
        return WebSession(principal_of(row["principal"]), row["method"], row["email"], row["csrf"], row["created"],
                          row["expires"])

    async def end(self, value: str) -> None:
        await self._store("end_web_session", _key(value))

    @staticmethod
    def check_csrf(session: WebSession, sent: str) -> None:
        if not sent:
            raise SessionError(403, Error.CSRF_FAILED, f"a change needs the session's CSRF token in {CSRF_HEADER}")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise SessionError(403, Error.CSRF_FAILED, f"the {CSRF_HEADER} header does not match this session's token")

    # sign-ins in progress

    async def begin(self, now: float | None = None) -> tuple[Pending, str]:
        """A new OIDC sign-in in progress, and the value of the cookie binding it to this browser."""
        now = time.time() if now is None else now
        browser = secrets.token_urlsafe(24)
        pending = Pending(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48),
                          _key(browser), now)
        await self._store("begin_signin", pending.state, "oidc", {"nonce": pending.nonce, "verifier": pending.verifier,
                                                                  "browser": pending.browser, "started": now},
                          now + PENDING_TTL)
        return pending, browser

    async def resume(self, state: str, browser: str, now: float | None = None) -> Pending:
        """The sign-in `state` names, once (whichever replica asks first takes it), if this
        browser started it and it is recent."""
        now = time.time() if now is None else now
        found = await self._store("take_signin", state, "oidc", now) if state else None
        if found is None:
            raise SessionError(400, Error.SIGNIN_FAILED,
                               "state does not match any sign-in in progress (expired, used already, or forged)")
        if not browser or not hmac.compare_digest(_key(browser), found["browser"]):
            raise SessionError(400, Error.SIGNIN_FAILED, "this browser did not start that sign-in")
        return Pending(state, found["nonce"], found["verifier"], found["browser"], found["started"])

    async def begin_saml(self, request_id: str, now: float | None = None) -> None:
        """Keep a SAML AuthnRequest outstanding until it is answered or REQUEST_TTL passes."""
        now = time.time() if now is None else now
        await self._store("begin_signin", request_id, "saml", {"started": now}, now + REQUEST_TTL)

    async def outstanding_saml(self, request_id: str, now: float | None = None) -> dict[str, float]:
        """The outstanding request a response says it answers, as pysaml2 wants it ({} if none)."""
        now = time.time() if now is None else now
        found = await self._store("peek_signin", request_id, "saml", now) if request_id else None
        return {request_id: found["started"]} if found else {}

    async def answered_saml(self, request_id: str, now: float | None = None) -> None:
        """Mark a verified response's request answered: once, whichever replica is first."""
        now = time.time() if now is None else now
        if await self._store("take_signin", request_id, "saml", now) is None:
            raise SessionError(400, Error.SIGNIN_FAILED, UNSOLICITED)
