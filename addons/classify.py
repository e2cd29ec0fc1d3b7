"""classify: which registered connection a flow is for, and what the request does.

Traffic to anything that is not a registered connection is refused, on the CONNECT as well
as on the request, so Custody is never an open proxy. The target is the tunnel's (or the
request line's) host and port; a Host header or TLS SNI that names a different host is
refused rather than trusted, because the upstream would route on it. Header forms a proxy
must reject (obs-fold, controls in values, two Hosts) are refused with 400, and a response
that has them with 502. Protocols the gateway cannot govern (raw TCP, UDP, h2c, SPDY, and
WebSocket except Kubernetes exec, attach and port-forward and the stream steps of a bridge
contract, whose frames the chain records and masks) are refused; the h2c upgrade is seen
as the client sent it, before mitmproxy's own disable_h2c strips it and would let the
request through as if it had never asked. A connection whose backend routes
case-insensitively has its paths folded for the rules.

kubectl falls back from a refused WebSocket exec to SPDY, and would print the SPDY refusal
instead of the real one (a denial, or the id of the approval it waits for). So a refused
WebSocket exec is remembered for a minute, and the SPDY fallback gets the same answer.
"""

from __future__ import annotations

import json
import time

from mitmproxy import http
from mitmproxy.net.http import url

from addons import classifiers, context, failclosed
from addons.classifiers.http import ambiguity, case_ambiguity, fold_case, header_problem
from addons.engine.bridge import SSH
from addons.engine.errors import Error
from addons.engine.model import Decision, Request
from addons.failclosed import guarded
from addons.settings import Settings

DEFAULT_PORTS = {"http": 80, "https": 443}


def authority_mismatch(f: http.HTTPFlow) -> str | None:
    """Why the Host header or SNI disagrees with the real target, or None if they agree."""
    req = f.request
    if req.authority and not (req.is_http2 or req.is_http3):
        # an absolute-form request line inside a tunnel: servers route on it, not on Host
        try:
            host, port = url.parse_authority(req.authority, check=True)
        except ValueError:
            return "the request target is not a valid authority"
        if host.lower().rstrip(".") != req.host.lower().rstrip(".") or (port or DEFAULT_PORTS.get(req.scheme)) != req.port:
            return f"request target {req.authority!r} does not match the tunnel to {req.host}:{req.port}"
    header = req.host_header
    if header:
        try:
            host, port = url.parse_authority(header, check=True)
        except ValueError:
            return "Host header is not a valid authority"
        port = port or DEFAULT_PORTS.get(req.scheme, req.port)
        if host.lower().rstrip(".") != req.host.lower().rstrip(".") or port != req.port:
            return f"Host header {header!r} does not match the request target {req.host}:{req.port}"
    sni = f.client_conn.sni
    if sni and sni.lower().rstrip(".") != req.host.lower().rstrip("."):
        return f"TLS server name {sni!r} does not match the request target {req.host}"
    return None


WEBSOCKET_SUBRESOURCES = ("exec", "attach", "portforward")


def operation_of(conn, request: http.Request):
    """The Operation, from the classifier registered for the connection's kind."""
    view = Request(request.method, request.path, tuple(request.headers.items(multi=True)),
                   request.get_content(strict=False))
    return classifiers.classify(conn.kind, conn.name, view)


SPDY_MESSAGE = ("SPDY streams cannot be inspected by the gateway; use kubectl 1.30 or newer, which speaks "
                "WebSocket (KUBECTL_REMOTE_COMMAND_WEBSOCKETS=true, the default since 1.31)")
FALLBACK_WINDOW = 60.0
FALLBACK_MEMORY = 10_000


def upgrade_refusal(conn, upgrade: str, operation) -> str | None:
    """Protocol upgrades the gateway can govern: WebSocket for Kubernetes exec, attach and
    port-forward, and for ssh_bridge's stream steps (each frame is then recorded and
    masked). Nothing else."""
    if not upgrade:
        return None
    if upgrade.lower().startswith("spdy"):
        return SPDY_MESSAGE
    if (conn.kind == "kubernetes" and upgrade.lower() == "websocket"
            and operation.details.get("subresource") in WEBSOCKET_SUBRESOURCES):
        return None
    if conn.kind == "ssh" and upgrade.lower() == "websocket" and operation.details.get("phase") in SSH.streams:
        return None
    if "h2c" in (token.strip().lower() for token in upgrade.split(",")):
        return "an HTTP/2 cleartext upgrade (h2c) is not governed; send HTTP/1.1 without Upgrade, or HTTP/2 over TLS"
    return f"protocol upgrade to {upgrade!r} is not governed on {conn.kind} connections"


class Classify:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refused_websockets: dict[tuple, tuple[float, Decision, dict]] = {}

    def _connection(self, f: http.HTTPFlow):
        conn = self.settings.registry.find(f.request.host, f.request.port)
        if conn is None:
            failclosed.refuse(
                f,
                403,
                f"{f.request.host}:{f.request.port} is not a registered connection",
                error=Error.UNKNOWN_CONNECTION,
            )
        return conn

    @guarded
    def http_connect(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        conn = self._connection(f)
        if conn is not None:
            ctx = context.of(f)
            ctx.connection = conn.name
            ctx.decision = Decision(effect="allow", reason=f"tunnel to connection {conn.name}")

    @guarded
    def requestheaders(self, f: http.HTTPFlow) -> None:
        f.request.stream = False  # decisions need the whole request, body included
        context.of(f).upgrade = f.request.headers.get("upgrade", "")
        if f.is_replay == "request" and (requested := f.metadata.get(context.REQUESTED)):
            # a replayed flow was rerouted to its upstream: it is classified as asked for, again
            f.request.scheme, f.request.host, f.request.port = requested

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        conn = self._connection(f)
        if conn is None:
            return
        ctx = context.of(f)
        ctx.connection, ctx.protocol = conn.name, conn.kind
        if problem := header_problem(f.request.headers.fields, f.request.http_version):
            failclosed.refuse(f, 400, f"{problem}; it was not forwarded", error=Error.MALFORMED_HEADERS)
            return
        if problem := authority_mismatch(f):
            failclosed.refuse(f, 400, problem, error=Error.MISDIRECTED_REQUEST)
            return
        path = f.request.path.split("?", 1)[0]
        if problem := ambiguity(path) or (conn.case_insensitive_paths and case_ambiguity(path)):
            failclosed.refuse(f, 400, f"{problem}; send the resolved path", error=Error.AMBIGUOUS_PATH)
            return
        if not (f.request.is_http2 or f.request.is_http3):
            f.request.authority = ""  # upstream gets origin-form, so Host is the only authority
        ctx.operation = operation_of(conn, f.request)
        if conn.case_insensitive_paths:
            ctx.operation = fold_case(ctx.operation)
        if conn.kind in ("postgres", "ssh", "mcp") and ctx.operation.details.get("session"):
            ctx.session = ctx.operation.details["session"]  # the client's session, not its HTTP connection
        if problem := upgrade_refusal(conn, ctx.upgrade, ctx.operation):
            if problem == SPDY_MESSAGE and (earlier := self._refused_websocket(f)):
                decision, extra = earlier
                failclosed.refuse(f, decision.status, decision.reason, error=decision.error, rules=decision.rules,
                                  approval=decision.approval, extra=extra)
            else:
                failclosed.refuse(f, 403, problem, error=Error.UNSUPPORTED_PROTOCOL)

    def _key(self, f: http.HTTPFlow) -> tuple | None:
        ctx = context.of(f)
        if ctx.principal is None or ctx.operation is None or ctx.operation.protocol != "kubernetes":
            return None
        return ctx.principal.issuer, ctx.principal.subject, ctx.connection, f.request.path

    def _refused_websocket(self, f: http.HTTPFlow) -> tuple[Decision, dict] | None:
        hit = self.refused_websockets.pop(self._key(f), None)
        if hit is None or time.monotonic() - hit[0] > FALLBACK_WINDOW:
            return None
        return hit[1], hit[2]

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        """A response with a header form a proxy must reject goes no further (RFC 9112 5.2:
        a proxy discards an obs-folded response and answers 502)."""
        if f.response.status_code == 101:
            return  # an upgraded session: its frames are governed, not its headers
        if problem := header_problem(f.response.headers.fields):
            failclosed.refuse_at_headers(f, 502, f"the upstream's response: {problem}; it was not forwarded",
                                         error=Error.MALFORMED_HEADERS)

    @guarded
    def response(self, f: http.HTTPFlow) -> None:
        """Remember a refused Kubernetes WebSocket upgrade for the SPDY fallback that follows."""
        d = context.of(f).decision
        if d is None or d.effect != "deny" or f.request.headers.get("upgrade", "").lower() != "websocket":
            return
        if (key := self._key(f)) is None:
            return
        now = time.monotonic()
        if len(self.refused_websockets) >= FALLBACK_MEMORY:
            self.refused_websockets = {k: v for k, v in self.refused_websockets.items() if now - v[0] <= FALLBACK_WINDOW}
            if len(self.refused_websockets) >= FALLBACK_MEMORY:
                del self.refused_websockets[next(iter(self.refused_websockets))]  # the oldest
        try:
            state = json.loads(f.response.content or b"{}").get("state")
        except ValueError:
            state = None
        self.refused_websockets[key] = (now, d, {"state": state} if state else {})
