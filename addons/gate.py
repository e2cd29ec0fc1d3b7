"""The gate: the last word on every flow. Only a cleared flow leaves the gateway.

A flow is cleared when an allow decision for it is on record (see `Context.cleared`).
The gate runs after every other addon, mitmproxy's own included, and lives outside the
chain script: if `addons/chain.py` fails to load or reload, or any addon in it is skipped,
nothing is cleared and the gate refuses everything rather than turning mitmdump into an
open proxy. It also refuses a request that something redirected after its decision.
"""

from __future__ import annotations

from mitmproxy import http, tcp

from addons import context, failclosed
from addons.failclosed import guarded


class Gate:
    def _check(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        ctx = context.of(f)
        if not ctx.cleared:
            failclosed.refuse(f, 502, "the request was not cleared by the custody chain", error="not_cleared")
        elif ctx.destination is not None and (f.request.host, f.request.port) != ctx.destination:
            failclosed.refuse(f, 502, "the request was redirected after its decision", error="not_cleared")

    @guarded
    def http_connect(self, f: http.HTTPFlow) -> None:
        self._check(f)

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        self._check(f)

    @guarded
    def tcp_start(self, f: tcp.TCPFlow) -> None:
        failclosed.refuse_ungoverned(f)

    udp_start = tcp_start
