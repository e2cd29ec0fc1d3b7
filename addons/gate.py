"""The gate: the last word on every flow. Only a cleared flow leaves the gateway.

A flow is cleared when an allow decision for it is on record (see `Context.cleared`).
Connections that would be relayed as raw TCP, UDP or DNS are closed before they start.
The gate runs after every other addon, mitmproxy's own included, and lives outside the
chain script: if `addons/chain.py` fails to load or reload, or any addon in it is skipped,
nothing is cleared and the gate refuses everything rather than turning mitmdump into an
open proxy. It also refuses a request that something redirected after its decision.

mitmproxy's intercept addon runs after the chain and before the gate, so a flow an
operator intercepts in mitmweb is held here until it is resumed. If it was edited in the
meantime, the agent's request is not what goes out: the agent is told so (409), and the
edited copy is replayed, which makes it the console operator's own request (identified,
decided and recorded as such: addons/identity.py).
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx as mctx
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer, layers

from addons import context, failclosed
from addons.credentials import request_digest
from addons.engine.errors import Error
from addons.failclosed import guarded

logger = logging.getLogger(__name__)
POLL = 0.25
UNGOVERNED = (layers.TCPLayer, layers.UDPLayer, layers.DNSLayer, layers.RawQuicLayer)


class Closed(layer.Layer):
    """Put in place of a layer that would relay bytes nothing here can govern: it closes
    the client connection and relays nothing."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.Log("custody: refusing a connection no classifier understands (raw TCP/UDP/DNS)")
            yield commands.CloseConnection(self.context.client)


class Gate:
    def _check(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        ctx = context.of(f)
        if not ctx.cleared:
            failclosed.refuse(f, 502, "the request was not cleared by the custody chain", error=Error.NOT_CLEARED)
        elif ctx.destination is not None and (f.request.host, f.request.port) != ctx.destination:
            failclosed.refuse(f, 502, "the request was redirected after its decision", error=Error.NOT_CLEARED)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """mitmproxy relays raw TCP without asking any flow hook whether it may (tcp_start
        cannot stop it), so the layer itself is replaced before it can start."""
        if isinstance(nextlayer.layer, UNGOVERNED):
            nextlayer.layer = Closed(nextlayer.context)

    @guarded
    def http_connect(self, f: http.HTTPFlow) -> None:
        self._check(f)

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        while f.intercepted:  # polled: mitmproxy's kill() ends an intercept without resuming it
            try:
                await asyncio.wait_for(f.wait_for_resume(), POLL)
            except TimeoutError:
                pass
        c = context.of(f)
        if not failclosed.answered(f) and c.sent and request_digest(f.request) != c.sent:
            self._send_as_operator(f)
            return
        self._check(f)

    @staticmethod
    def _send_as_operator(f: http.HTTPFlow) -> None:
        edited = f.copy()
        failclosed.refuse(f, 409, "the request was edited in the mitmproxy console after its decision; the edit "
                                  "was sent as the console operator's own request, not as yours",
                          error=Error.EDITED_IN_CONSOLE)
        manager = mctx.master.commands
        if "view.flows.add" in manager.commands:  # mitmweb: the operator sees the request as theirs
            manager.call("view.flows.add", [edited])
        manager.call("replay.client", [edited])
        logger.info("custody: flow %s was edited in the console; replayed as %s by the console operator", f.id, edited.id)
