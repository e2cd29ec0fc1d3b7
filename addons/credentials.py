"""credentials: what the gateway holds for a connection, applied on the way upstream.

For a cleared flow it routes the request to the connection's upstream address (when that
differs from the name agents use), injects the connection's credential (replacing whatever
the agent sent), pins upstream TLS verification to the connection's CA and presents its
client certificate. The agent never sees or sends backend credentials. Connections with a
`listen` address also get a direct listener, for clients that cannot use a proxy.

Only HTTP-speaking upstreams (kinds in PROXIED) are reached this way; a Postgres flow is
answered by its terminal (pg_bridge/terminal/executor.py, ssh_bridge/terminal/executor.py), which holds the
database login or the SSH key itself.

The credential is sealed into the request (`seal`): the header's bytes are the credential,
which is what mitmproxy's HTTP/1 and HTTP/2 assembly put on the wire, but everything that
shows or saves a flow reads it as SHOWN: mitmweb's flow list and its /flows/dump, flow
files (`mitmdump -w`, save_stream_file), copies, duplicates, exports (curl, HAR) and
mitmproxy's own log. After the credential goes on, the request's digest is kept, so the
gate can tell a request someone edited before it left (addons/gate.py).

An MCP server the gateway runs holds its secrets itself (addons/mcpstdio.py). An `oauth`
credential is an access token from a client-credentials grant, fetched off the event loop
and reused until shortly before it expires; when none can be had, the request is refused
rather than sent without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import certifi
from mitmproxy import ctx as mctx
from mitmproxy import http, tls
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from addons import context, failclosed
from addons.engine.config import Connection
from addons.engine.errors import Error
from addons.engine.oauth import ClientCredentials, GrantError
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
PROXIED = ("http", "kubernetes", "mcp", "llm")


def routed(conn: Connection) -> bool:
    """Does the gateway send this connection's cleared requests upstream (rather than a terminal answer them)?"""
    return conn.kind in PROXIED and not (conn.mcp is not None and conn.mcp.stdio is not None)


def upstream_context(conn: Connection) -> SSL.Context:
    """The TLS client context for a connection: trust pinned to its CA file (else the
    system's), and the client certificate it presents, if it has one."""
    ssl_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ssl_ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ssl_ctx.set_verify(net_tls.Verify.VERIFY_PEER.value, None)
    ssl_ctx.load_verify_locations(conn.ca_file or certifi.where())
    if conn.client_cert:
        ssl_ctx.use_certificate_chain_file(conn.client_cert)
        ssl_ctx.use_privatekey_file(conn.client_cert)
    return ssl_ctx


def untrusting_context() -> SSL.Context:
    """Trusts nothing: every handshake fails. Used when pinning itself went wrong."""
    ssl_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ssl_ctx.set_verify(net_tls.Verify.VERIFY_PEER.value, None)
    return ssl_ctx


SHOWN = "[custody: gateway credential]"


class Sealed(bytes):
    """A header value whose bytes are the credential (the wire reads the buffer), and which
    reads as SHOWN however Python is asked to show it: decoded (mitmproxy's headers decode
    values to show them), printed, or prefixed (mitmproxy escapes values as b'"' + value)."""

    def decode(self, *args, **kwargs) -> str:
        return SHOWN

    def __repr__(self) -> str:
        return repr(SHOWN.encode())

    __str__ = __repr__

    def __radd__(self, other: bytes) -> bytes:
        return bytes(other) + SHOWN.encode()

    def __add__(self, other: bytes) -> bytes:
        return SHOWN.encode() + bytes(other)


class SealedHeaders(http.Headers):
    """Headers whose saved state (flow files, copies, backups, duplicates) shows SHOWN in
    place of a sealed value; assembly reads `fields`, which keep the credential."""

    def get_state(self):
        return tuple((k, SHOWN.encode() if isinstance(v, Sealed) else v) for k, v in self.fields)


def seal(request: http.Request, name: str, value: str) -> None:
    """Set header `name` to the credential `value`, sealed. An HTTP/2 or HTTP/3 request is
    put in HTTP/1.1 form first, as mitmproxy's HTTP/1 client would do to a copy of it (and
    a copy shows the credential as SHOWN); mitmproxy's HTTP/2 client sends either form."""
    if request.is_http2 or request.is_http3:
        request.http_version = "HTTP/1.1"
        if "host" not in request.headers and request.authority:
            request.headers.insert(0, "Host", request.authority)
        request.authority = ""
        request.headers["connection"] = "close"  # as mitmproxy does: one request per HTTP/1 upstream connection
        if len(cookies := request.headers.get_all("cookie")) > 1:
            request.headers["cookie"] = "; ".join(cookies)
    key = name.lower().encode()
    fields = [f for f in request.headers.fields if f[0].lower() != key]
    request.headers = SealedHeaders([*fields, (name.encode(), Sealed(value.encode()))])


def request_digest(request: http.Request) -> str:
    """What identifies the request as it is about to leave (sealed values as shown)."""
    state = request.get_state()
    return hashlib.sha256(repr(sorted(state.items())).encode()).hexdigest()


def apply(request: http.Request, conn: Connection, credential: tuple[str, str] | None) -> None:
    """Route `request` to the connection's upstream and put the gateway's credential (a
    header name and value) on it, sealed. Whatever credential the agent sent is removed:
    backend credentials are the gateway's."""
    request.headers.pop("authorization", None)
    if conn.upstream is not None:
        request.scheme = conn.upstream.scheme
        request.host = conn.upstream.host
        request.port = conn.upstream.port
    if credential is not None:
        seal(request, *credential)


class Credentials:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.by_upstream: dict[tuple[str, int], Connection] = {}
        self.grants: dict[str, ClientCredentials] = {}

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            connections = self.settings.require().connections
            self.by_upstream = {
                (c.upstream.host, c.upstream.port): c for c in connections if c.upstream and c.kind in PROXIED
            }
            self.grants = {c.name: ClientCredentials(c.credential.client_id, c.credential.value,
                                                     token_url=c.credential.token_url, scope=c.credential.scope,
                                                     audience=c.credential.audience, direct=True)
                           for c in connections if c.credential is not None and c.credential.type == "oauth"}

    async def header(self, conn: Connection) -> tuple[str, str] | None:
        """The header that carries the gateway's credential for `conn`; GrantError when an
        OAuth token cannot be had."""
        if conn.credential is None:
            return None
        if conn.credential.type == "oauth":
            token = await asyncio.to_thread(self.grants[conn.name].token)
            return "authorization", f"Bearer {token}"
        return conn.credential.header, conn.credential.value

    def running(self) -> None:
        """Direct listeners (mitmproxy reverse mode) for connections whose clients cannot
        use a proxy; added once running, as mitmdump loads the chain while it starts."""
        modes = list(mctx.options.mode)
        for c in self.settings.require().connections:
            if c.listen is not None and c.kind in PROXIED:
                host = c.hosts[0]
                spec = f"reverse:https://{host}@{c.listen[0]}:{c.listen[1]}"
                if spec not in modes:
                    modes.append(spec)
        if modes != list(mctx.options.mode):
            mctx.options.update(mode=modes)

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        ctx = context.of(f)
        if not ctx.cleared:
            return  # the gate refuses it
        conn = self.settings.registry.by_name[ctx.connection]
        if not routed(conn):
            return  # answered by its terminal
        f.metadata[context.REQUESTED] = (f.request.scheme, f.request.host, f.request.port)
        try:
            credential = await self.header(conn)
        except GrantError as e:
            logger.error("custody: no OAuth token for connection %s: %s", conn.name, e)
            failclosed.refuse(f, 502, f"the gateway could not get its token for {conn.name} from the token endpoint; "
                                      "nothing was sent", error=Error.GATEWAY_ERROR)
            return
        apply(f.request, conn, credential)
        ctx.destination = (f.request.host, f.request.port)
        ctx.sent = request_digest(f.request)

    def _connection_for(self, address: tuple[str, int]) -> Connection | None:
        return self.by_upstream.get(address) or self.settings.registry.find(*address)

    def tls_start_server(self, data: tls.TlsData) -> None:
        """Pin the upstream's trust to the connection's CA (mitmproxy's tlsconfig ran first).

        mitmproxy's tlsconfig builds the connection (SNI, ALPN, hostname verification); it runs
        before this hook under `custody run` and after it under mitmdump, where the chain is
        a script, so it is asked to build the connection first when it has not yet. Swapping
        the context then replaces only the trust store, so the name is still checked.
        """
        server = data.conn
        if not server.address:
            return
        conn = self._connection_for(server.address)
        if conn is None or not (conn.ca_file or conn.client_cert):
            return
        try:
            if data.ssl_conn is None:
                mctx.master.addons.get("tlsconfig").tls_start_server(data)
            data.ssl_conn.set_context(upstream_context(conn))
        except Exception:
            logger.exception("custody: pinning TLS for %s failed; the handshake will fail", conn.name)
            data.ssl_conn.set_context(untrusting_context())
