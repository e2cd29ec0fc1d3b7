"""limits: what one client may cost the gateway's listeners, before anything else reads it.

- Headers: a request (or CONNECT) with more header lines than `limits.header_lines`, or a
  larger header block than `limits.header_bytes`, is refused with 431 `headers_too_large`
  at its headers, before any other addon walks them (identity, classify and the recorder
  all read every field). Its record keeps only the fields within the bounds, so a refusal
  cannot grow the audit store by what an attacker sends. HTTP/2 requests are bounded the
  same way here, and their header list by the h2 library's own limit first (64 KiB).
- Connections: each listener (the proxy, the approvals listener, a connection's direct
  listener) accepts at most `connections` open clients; mitmproxy refuses the next one
  when `client_connected` sets `client.error`.
- Time to authenticate: a client whose first request head has not arrived `authenticate`
  after it connected (it sent nothing, or is still sending its head) is disconnected.
- Idle time: mitmproxy's `tcp_timeout` (its TimeoutWatchdog, mitmproxy/proxy/server.py),
  kept at `limits.idle`. The watchdog is disarmed while a hook runs
  (mitmproxy/proxy/mode_servers.py, ProxyConnectionHandler.handle_hook), so a flow held for
  approval, which waits inside the hold's request hook, is never cut for being idle —
  once `HoldAwareWatchdog` stands in for mitmproxy's, which can fire while disarmed.

A connection's own `limits` apply to its direct listener; every other listener uses the
top-level ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time

from mitmproxy import connection, ctx, http
from mitmproxy.proxy import server

from addons import failclosed
from addons.engine.config import LimitsConfig
from addons.engine.errors import Error
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
LINE_OVERHEAD = len(b": \r\n")
"""What each field adds to the header block besides its name and value, in HTTP/1.1 form."""


def header_excess(fields: tuple[tuple[bytes, bytes], ...], limits: LimitsConfig) -> str | None:
    """Why these header fields are more than `limits` allow, or None. One pass over the
    fields, and none at all past the line limit."""
    if len(fields) > limits.header_lines:
        return f"{len(fields)} header lines, more than the {limits.header_lines} allowed"
    size = sum(len(name) + len(value) + LINE_OVERHEAD for name, value in fields)
    if size > limits.header_bytes:
        return f"{size} bytes of header fields, more than the {limits.header_bytes} allowed"
    return None


def within(fields: tuple[tuple[bytes, bytes], ...], limits: LimitsConfig) -> tuple[tuple[bytes, bytes], ...]:
    """The leading fields that fit in `limits`: what a refused request's record keeps."""
    kept, size = [], 0
    for name, value in fields[:limits.header_lines]:
        size += len(name) + len(value) + LINE_OVERHEAD
        if size > limits.header_bytes:
            break
        kept.append((name, value))
    return tuple(kept)


def disconnect(client: connection.Client, reason: str) -> None:
    """Close a client connection from outside its handler, the way mitmproxy's own idle
    timeout does (mitmproxy/proxy/server.py, ConnectionHandler.on_timeout: cancel the task
    that reads from the client; the handler then closes everything and says goodbye)."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(client.id) if server is not None else None
    io = handler.transports.get(client) if handler is not None else None
    if io is not None and io.handler is not None:
        io.handler.cancel(reason)


def close_forgotten(client: connection.Client) -> None:
    """Close the socket of a client mitmproxy is done with but did not close.

    mitmproxy's ConnectionHandler.handle_connection (mitmproxy/proxy/server.py) closes the
    client's writer at its end; a cancellation that arrives while it waits for the event
    lock to report the client's EOF (a refusal closing the connection just as the client
    half-closes) skips that, and the socket stays in CLOSE-WAIT for good, outside every
    limit: a client could use up the gateway's file descriptors. By the time mitmproxy
    says the client disconnected, its reader has ended, so a writer still there is one
    nobody will close."""
    server = ctx.master.addons.get("proxyserver")
    handler = server.connections.get(client.id) if server is not None else None
    io = handler.transports.get(client) if handler is not None else None
    if io is not None and io.writer is not None and not io.writer.is_closing():
        logger.debug("custody: closing the socket mitmproxy left open for %s", client.peername)
        io.writer.close()


class HoldAwareWatchdog(server.TimeoutWatchdog):
    """mitmproxy's idle watchdog, which does not cut a connection while a hook is running.

    mitmproxy's `watch` waits until it may time out, sleeps until the last activity plus the
    timeout, and then fires without asking again whether it may: a hook that began during
    that sleep — a request held for approval, which sends and receives nothing — is cut
    when the sleep ends, if no event came between the sleep's start and the hold's. Which
    of the two came first is a matter of scheduling, so a held request was cut at
    `limits.idle` now and then, more often on a busy machine. This one checks again."""

    async def watch(self) -> None:
        try:
            while True:
                await self.can_timeout.wait()
                await asyncio.sleep(self.timeout - (time.time() - self.last_activity))
                if self.can_timeout.is_set() and self.last_activity + self.timeout < time.time():
                    await self.callback()
                    return
        except asyncio.CancelledError:
            return


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = LimitsConfig()
        self.direct: dict[tuple[str, int], LimitsConfig] = {}
        """Direct listeners' addresses and their connection's limits."""
        self.open: collections.Counter[str] = collections.Counter()
        """Open clients per listener (its mode spec)."""
        self.clients: dict[str, str] = {}
        """Each counted client's listener."""
        self.deadlines: dict[str, asyncio.TimerHandle] = {}
        """Clients whose first request head has not arrived yet."""

    def load(self, loader) -> None:
        server.TimeoutWatchdog = HoldAwareWatchdog  # ConnectionHandler.__init__ looks it up here

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            cfg = self.settings.require()
            self.limits = cfg.limits
            self.direct = {c.listen: c.limits for c in cfg.connections if c.listen is not None}
        if self.settings.changed(updated) or "tcp_timeout" in updated:
            idle = max(1, math.ceil(self.limits.idle))
            if ctx.options.tcp_timeout != idle:
                ctx.options.update(tcp_timeout=idle)

    def listener(self, client: connection.Client) -> LimitsConfig:
        mode = client.proxy_mode
        return self.direct.get((mode.custom_listen_host, mode.custom_listen_port), self.limits)

    def client_connected(self, client: connection.Client) -> None:
        limits, spec = self.listener(client), client.proxy_mode.full_spec
        if self.open[spec] >= limits.connections:
            client.error = f"custody: {limits.connections} connections are open on {spec}, its limit"
            logger.info("custody: refusing a connection from %s: %s", client.peername, client.error)
            return
        self.open[spec] += 1
        self.clients[client.id] = spec
        self.deadlines[client.id] = asyncio.get_running_loop().call_later(
            limits.authenticate, self._too_slow, client, limits.authenticate)

    def _too_slow(self, client: connection.Client, seconds: float) -> None:
        self.deadlines.pop(client.id, None)
        logger.info("custody: closing the connection from %s: no request within %gs", client.peername, seconds)
        disconnect(client, "custody: no request in time")

    def client_disconnected(self, client: connection.Client) -> None:
        close_forgotten(client)
        if (deadline := self.deadlines.pop(client.id, None)) is not None:
            deadline.cancel()
        if (spec := self.clients.pop(client.id, None)) is not None:
            self.open[spec] -= 1
            if not self.open[spec]:
                del self.open[spec]

    def _check(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        fields = f.request.headers.fields
        if (problem := header_excess(fields, self.limits)) is None:
            return
        f.request.headers = http.Headers(within(fields, self.limits))  # what its record keeps
        failclosed.refuse(f, 431, f"{problem}; nothing was forwarded", error=Error.HEADERS_TOO_LARGE)

    @guarded
    def http_connect(self, f: http.HTTPFlow) -> None:
        self._check(f)

    @guarded
    def requestheaders(self, f: http.HTTPFlow) -> None:
        if (deadline := self.deadlines.pop(f.client_conn.id, None)) is not None:
            deadline.cancel()
        self._check(f)
