"""hardening: keeps the mitmproxy options the chain depends on at the values it needs.

No upstream connection before a decision; no request or response streamed before the
chain has seen it; nothing relayed as raw TCP/UDP or passed through uninspected. Whatever
a command line or mitmweb's options page sets, these win.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

logger = logging.getLogger(__name__)

REQUIRED = {
    "connection_strategy": "lazy",
    "stream_large_bodies": None,
    "rawtcp": False,
    "tcp_hosts": [],
    "udp_hosts": [],
    "ignore_hosts": [],
    "allow_hosts": [],
}


class Hardening:
    def configure(self, updated: set[str]) -> None:
        wrong = {k: v for k, v in REQUIRED.items() if k in ctx.options and getattr(ctx.options, k) != v}
        if wrong:
            logger.warning("custody: overriding mitmproxy options the gateway cannot allow: %s", ", ".join(wrong))
            ctx.options.update(**wrong)
