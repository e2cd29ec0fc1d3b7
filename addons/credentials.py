"""credentials: what the gateway holds for a connection, applied on the way upstream.

For a cleared flow it routes the request to the connection's upstream address (when that
differs from the name agents use), injects the connection's credential (replacing whatever
the agent sent), pins upstream TLS verification to the connection's CA and presents its
client certificate. The agent never sees or sends backend credentials. Connections with a
`listen` address also get a direct listener, for clients that cannot use a proxy.

Only HTTP-speaking upstreams (kinds in PROXIED) are reached this way; a Postgres flow is
answered by its terminal (pg_bridge/terminal/executor.py, ssh_bridge/terminal/executor.py), which holds the
database login or the SSH key itself.
"""

from __future__ import annotations

import logging

import certifi
from mitmproxy import ctx as mctx
from mitmproxy import http, tls
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from addons import context, failclosed
from addons.engine.config import Connection
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
PROXIED = ("http", "kubernetes")


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


def apply(request: http.Request, conn: Connection) -> None:
    """Route `request` to the connection's upstream and put the gateway's credential on it.
    Whatever credential the agent sent is removed: backend credentials are the gateway's."""
    request.headers.pop("authorization", None)
    if conn.upstream is not None:
        request.scheme = conn.upstream.scheme
        request.host = conn.upstream.host
        request.port = conn.upstream.port
    if conn.credential is not None:
        request.headers[conn.credential.header] = conn.credential.value


class Credentials:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.by_upstream: dict[tuple[str, int], Connection] = {}

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            connections = self.settings.require().connections
            self.by_upstream = {
                (c.upstream.host, c.upstream.port): c for c in connections if c.upstream and c.kind in PROXIED
            }

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
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        ctx = context.of(f)
        if not ctx.cleared:
            return  # the gate refuses it
        conn = self.settings.registry.by_name[ctx.connection]
        if conn.kind not in PROXIED:
            return  # answered by its terminal
        apply(f.request, conn)
        ctx.destination = (f.request.host, f.request.port)

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
