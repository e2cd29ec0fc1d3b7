"""hardening: keeps mitmproxy working the way the gateway needs it to.

Options: no upstream connection before a decision; no request or response streamed
before the chain has seen it; nothing relayed as raw TCP/UDP or passed through
uninspected. Whatever a command line or mitmweb's options page sets, these win.

Startup: mitmproxy's errorcheck ends the process when an error is logged before startup
finishes. A flow the chain refused because something inside it failed is logged as an
error too, and the first agents may arrive before startup finishes (the listeners open
first): that must not stop the gateway. So errorcheck counts only the chain's startup
problems (settings.invalid marks them), not what it logs about flows.
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


STARTUP = "custody_startup"
"""The `extra` mark of a log record that is a startup problem (addons/settings.py)."""
CHAIN_LOGGERS = ("addons", "pg_bridge", "ssh_bridge")


def startup_problem(record: logging.LogRecord) -> bool:
    """errorcheck's filter: everything, except what the chain logs about flows."""
    return record.name.split(".")[0] not in CHAIN_LOGGERS or getattr(record, STARTUP, False)


class Hardening:
    def load(self, loader) -> None:
        handler = getattr(ctx.master.addons.get("errorcheck"), "logger", None)
        if handler is not None and startup_problem not in handler.filters:
            handler.addFilter(startup_problem)

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
