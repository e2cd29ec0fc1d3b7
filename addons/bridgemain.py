"""What `python -m pg_bridge` and `python -m ssh_bridge` share: reading the configuration
without its secrets (a bridge holds no backend credential), and running listeners until
SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from addons import config


def load(prog: str, path: str | None) -> config.Config | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return config.load(config.find(path), secrets=False)
    except config.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


async def serve_until_stopped(servers: list) -> int:
    """Wait for SIGINT/SIGTERM, then close every listener (`.server.close()`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.server.close()
    return 0
