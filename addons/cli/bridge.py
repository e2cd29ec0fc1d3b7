"""What `python -m pg_bridge` and `python -m ssh_bridge` share: the command line, reading
the configuration without its secrets (a bridge holds no backend credential), starting
the listeners, and running them until SIGINT or SIGTERM.

A bridge module hands `main` a function that builds its listeners from the configuration;
each listener has `start()`, `names` (the connections it serves), `address` and `server`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from addons.engine import config

Listeners = Callable[[config.Config, str, argparse.Namespace], list[Any]]


def main(prog: str, kind: str, doc: str, listeners: Listeners, argv: list[str] | None = None,
         options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    p.add_argument("--config", help="the gateway configuration (default: $CUSTODY_CONFIG or ./custody.yaml)")
    p.add_argument("--proxy", default=os.environ.get("CUSTODY_PROXY", "http://127.0.0.1:8080"),
                   help="the gateway's proxy address")
    if options is not None:
        options(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = config.load(config.find(args.config), secrets=False)
    except config.ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(prog, kind, cfg, args, listeners))


async def serve(prog: str, kind: str, cfg: config.Config, args: argparse.Namespace, listeners: Listeners) -> int:
    servers = listeners(cfg, args.proxy, args)
    if not servers:
        print(f"{prog}: no {kind} connection with a listen address in {cfg.path}", file=sys.stderr)
        return 2
    for s in servers:
        await s.start()
        print(f"{prog}: {', '.join(s.names)} on {s.address[0]}:{s.address[1]} -> gateway {args.proxy}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.server.close()
    return 0
