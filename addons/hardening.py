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
        if not wrong:
            return
        # mitmproxy's own defaults (eager connections, raw TCP) are replaced silently; a value
        # someone chose is replaced with a warning, so they know it did not take effect.
        chosen = [k for k in wrong if getattr(ctx.options, k) != ctx.options.default(k)]
        if chosen:
            logger.warning("custody: overriding mitmproxy options the gateway cannot allow: %s", ", ".join(chosen))
        ctx.options.update(**wrong)
