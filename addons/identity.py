"""identity: who is asking. Verifies the agent's OIDC token and writes the Principal.

Token sources, in order: `Proxy-Authorization` (Bearer, or Basic whose password is the
token, as `HTTPS_PROXY=http://agent:TOKEN@gw:8080` sends it), the token presented on the
CONNECT of the tunnel the request travels in, and, only for connections whose config says
the bearer header belongs to the gateway (kubeconfig tokens), `Authorization: Bearer`.
The token is stripped before anything goes upstream; so are the agent's asserted
`X-Custody-*` attributes, which are kept on the Principal as asserted, never as verified.

On the gateway's own host, a browser signed in with SSO has no token but a session cookie
(addons/signin.py): without a token, the session behind the cookie is the Principal, and a
change (any method but GET/HEAD/OPTIONS) also needs the session's CSRF token in a header
(403 `csrf_failed` without it; an expired or signed-out session is 401).

Failure answers 407 (proxy credentials) or 401 (bearer header) with a JSON reason; the
recorder writes it down and nothing reaches the upstream.

A flow replayed from mitmweb or the console (mitmproxy replays the flow object itself, with
its client connection and context) is a new request by the console operator: it starts a
fresh context in a session of its own, and its principal is OPERATOR, whatever tokens or
tunnel the copied flow carried. Rules decide for that principal like any other (no rule
for it: denied).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import weakref

from mitmproxy import connection, http

from addons import context, failclosed
from addons.engine.approval import CONSOLE
from addons.engine.errors import Error
from addons.engine.model import AGENT_ATTRIBUTES, Principal, attribute_limit, new_id
from addons.engine.config import GATEWAY_CONNECTION
from addons.engine.tokens import TokenError, Verifier
from addons.engine.websession import SessionError
from addons.failclosed import guarded
from addons.settings import Settings
from addons.signin import Signin

ASSERTED_PREFIX = "x-custody-"
ASSERTED_HEADERS = {f"{ASSERTED_PREFIX}{name}": name for name in AGENT_ATTRIBUTES}
ATTRIBUTES_USER = "x-custody."
OPERATOR = Principal(subject=CONSOLE, issuer="mitmproxy")
"""Who a replayed flow's request is from: the operator of the mitmproxy console or mitmweb."""


def proxy_credentials(headers: http.Headers) -> tuple[str | None, dict[str, str]]:
    """The token in Proxy-Authorization (Bearer, or Basic with the token as password), and
    the agent attributes a Basic user name may carry (`x-custody.` + base64url of a JSON
    object): the one way clients that cannot add headers (kubectl, anything tunnelling
    through CONNECT) can say which agent, model and task they act for."""
    value = headers.get("proxy-authorization", "")
    scheme, _, credentials = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return credentials.strip(), {}
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return "", {}
        user, _, token = decoded.partition(":")
        return token, user_attributes(user)
    return ("" if value else None), {}


def user_attributes(user: str) -> dict[str, str]:
    if not user.startswith(ATTRIBUTES_USER):
        return {}
    encoded = user[len(ATTRIBUTES_USER):]
    try:
        document = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except (ValueError, RecursionError):  # not base64url, not JSON, or nested past what json parses
        return {}
    if not isinstance(document, dict):
        return {}
    return {k: str(v)[:attribute_limit(k)] for k, v in document.items() if k in AGENT_ATTRIBUTES and v}


def bearer_token(headers: http.Headers) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    return None


def asserted(headers: http.Headers) -> dict[str, str]:
    """The agent's own claims about itself, pulled off the request (every X-Custody-*
    header is the gateway's, so none goes upstream; the known ones are kept, repeated ones
    folded as HTTP folds them). One pass over the fields: popping header by header would
    walk them all once per header."""
    values: dict[str, list[str]] = {}
    kept = []
    for field in headers.fields:
        name = field[0].decode("utf-8", "surrogateescape").lower()
        if not name.startswith(ASSERTED_PREFIX):
            kept.append(field)
        elif (attribute := ASSERTED_HEADERS.get(name)) is not None:
            values.setdefault(attribute, []).append(field[1].decode("utf-8", "surrogateescape"))
    if len(kept) != len(headers.fields):
        headers.fields = tuple(kept)
    return {name: ", ".join(parts)[:attribute_limit(name)] for name, parts in values.items()}


class Identity:
    def __init__(self, settings: Settings, signin: Signin) -> None:
        self.settings = settings
        self.signin = signin
        self.verifier: Verifier | None = None
        self.tunnels: weakref.WeakKeyDictionary[connection.Client, str] = weakref.WeakKeyDictionary()
        self.tunnel_claims: weakref.WeakKeyDictionary[connection.Client, dict[str, str]] = weakref.WeakKeyDictionary()
        self._warming: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            cfg = self.settings.require()
            self.verifier = Verifier(cfg.identity)

    def running(self) -> None:
        """Fetch the issuers' keys in the background: a token that needs them waits for them
        anyway, and mitmproxy's start-up (which ends at the last running hook) must not wait on
        an IdP — mitmweb stops itself if its page logs an error before start-up ends."""
        if self.verifier:
            self._warming = asyncio.ensure_future(self.verifier.start())

    def done(self) -> None:
        if self._warming:
            self._warming.cancel()

    def _refuse(self, f: http.HTTPFlow, reason: str, bearer: bool) -> None:
        if bearer:
            status, challenge = 401, {"www-authenticate": 'Bearer realm="custody"'}
        else:
            status, challenge = 407, {"proxy-authenticate": 'Bearer realm="custody"'}
        failclosed.refuse(f, status, reason, error=Error.UNAUTHENTICATED, headers=challenge)

    async def _principal(self, f: http.HTTPFlow, token: str, bearer: bool) -> context.Principal | None:
        if not token:
            self._refuse(f, "malformed credentials", bearer)
            return None
        try:
            return await self.verifier.verify(token)
        except TokenError as e:
            self._refuse(f, str(e), bearer)
            return None

    @guarded
    async def http_connect(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        token, claims = proxy_credentials(f.request.headers)
        f.request.headers.pop("proxy-authorization", None)
        if claims:
            self.tunnel_claims[f.client_conn] = claims
        if token == "" and claims:
            token = None  # attributes only: each request in the tunnel brings its own token
        if token is None:
            conn = self.settings.registry.find(f.request.host, f.request.port)
            if conn is not None and conn.bearer_is_gateway:
                return  # each request in this tunnel must carry its own bearer token
            self._refuse(f, "no token: send Proxy-Authorization", bearer=False)
            return
        principal = await self._principal(f, token, bearer=False)
        if principal is not None:
            self.tunnels[f.client_conn] = token
            context.of(f).principal = principal

    @guarded
    def requestheaders(self, f: http.HTTPFlow) -> None:
        if f.is_replay == "request":
            context.restart(f, session=f"console-{new_id()}")

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        headers = f.request.headers
        conn = self.settings.registry.find(f.request.host, f.request.port)
        if conn is not None:  # a refusal here answers in the connection's shape (a Kubernetes Status)
            context.of(f).protocol = conn.kind
        gateway_bearer = conn is not None and conn.bearer_is_gateway
        if f.is_replay == "request":
            headers.pop("proxy-authorization", None)
            if gateway_bearer:
                headers.pop("authorization", None)
            asserted(headers)
            context.of(f).principal = OPERATOR
            return
        token, user_claims = proxy_credentials(headers)
        headers.pop("proxy-authorization", None)
        bearer = False
        if token is None:
            token = self.tunnels.get(f.client_conn)
        if token is None and gateway_bearer:
            token, bearer = bearer_token(headers), True
        if gateway_bearer:
            headers.pop("authorization", None)
        claims = {**self.tunnel_claims.get(f.client_conn, {}), **user_claims, **asserted(headers)}
        if token is None and conn is not None and conn.name == GATEWAY_CONNECTION:
            try:
                session = await self.signin.principal(headers, f.request.method)
            except SessionError as e:
                failclosed.refuse(f, e.status, str(e), error=e.error)
                return
            if session is not None:
                context.of(f).principal = session
                return
        if token is None:
            if bearer:
                self._refuse(f, "no token: send Authorization: Bearer", bearer=True)
            else:
                self._refuse(f, "no token: send Proxy-Authorization", bearer=False)
            return
        principal = await self._principal(f, token, bearer)
        if principal is not None:
            context.of(f).principal = dataclasses.replace(principal, asserted=claims) if claims else principal
