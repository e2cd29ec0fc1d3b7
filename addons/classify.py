"""classify: which registered connection a flow is for, and what the request does.

Traffic to anything that is not a registered connection is refused, on the CONNECT as well
as on the request, so Custody is never an open proxy. The target is the tunnel's (or the
request line's) host and port; a Host header or TLS SNI that names a different host is
refused rather than trusted, because the upstream would route on it. Protocols the gateway
cannot govern (raw TCP, UDP, upgrades to WebSocket or h2c) are refused.
"""

from __future__ import annotations

from mitmproxy import http
from mitmproxy.net.http import url

from addons import context, failclosed, httpops
from addons.connections import Registry
from addons.context import Decision
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


class Classify:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry(())

    def configure(self, updated: set[str]) -> None:
        if "custody_config" in updated:
            self.registry = Registry(self.settings.require().connections)

    def _connection(self, f: http.HTTPFlow):
        conn = self.registry.find(f.request.host, f.request.port)
        if conn is None:
            failclosed.refuse(
                f,
                403,
                f"{f.request.host}:{f.request.port} is not a registered connection",
                error="unknown_connection",
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

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        conn = self._connection(f)
        if conn is None:
            return
        if problem := authority_mismatch(f):
            failclosed.refuse(f, 400, problem, error="misdirected_request")
            return
        if problem := httpops.ambiguity(f.request.path.split("?", 1)[0]):
            failclosed.refuse(f, 400, f"{problem}; send the resolved path", error="ambiguous_path")
            return
        if "upgrade" in f.request.headers:
            failclosed.refuse(
                f,
                403,
                f"protocol upgrade to {f.request.headers['upgrade']!r} is not governed on {conn.kind} connections",
                error="unsupported_protocol",
            )
            return
        if not (f.request.is_http2 or f.request.is_http3):
            f.request.authority = ""  # upstream gets origin-form, so Host is the only authority
        ctx = context.of(f)
        ctx.connection = conn.name
        ctx.operation = httpops.classify(
            conn.name,
            f.request.method,
            f.request.path,
            {k.lower(): v for k, v in f.request.headers.items()},
            f.request.get_content(strict=False),
        )
