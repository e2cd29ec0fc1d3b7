"""The gate: the last word on every flow. Only a cleared flow leaves the gateway.

A flow is cleared when an allow decision for it is on record (see `Context.cleared`).
Connections that would be relayed as raw TCP, UDP or DNS are closed before they start.
The gate runs after every other addon, mitmproxy's own included, and lives outside the
chain script: if `addons/chain.py` fails to load or reload, or any addon in it is skipped,
nothing is cleared and the gate refuses everything rather than turning mitmdump into an
open proxy. It also refuses a request that something redirected after its decision.
"""

from __future__ import annotations

import logging

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer, layers

from addons import context, failclosed
from addons.engine.errors import Error
from addons.failclosed import guarded

logger = logging.getLogger(__name__)
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
    def request(self, f: http.HTTPFlow) -> None:
        self._check(f)
