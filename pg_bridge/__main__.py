"""`python -m pg_bridge`: serve every postgres connection that has a `listen` address.

The bridge holds no database credential and decides nothing: each client step goes to
the gateway (`--proxy`, default $CUSTODY_PROXY or http://127.0.0.1:8080) as an HTTP
request under the client's own token.
"""

from __future__ import annotations

import argparse
import sys

from addons.cli import bridge
from addons.engine import config
from pg_bridge.server.bridge import Bridge


def listeners(cfg: config.Config, proxy: str, args: argparse.Namespace) -> list[Bridge]:
    only = args.connection
    return [Bridge(c, proxy) for c in cfg.connections
            if c.kind == "postgres" and c.listen and (not only or c.name in only)]


def options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connection", action="append", help="serve only this connection (repeatable)")


def main(argv: list[str] | None = None) -> int:
    return bridge.main("pg_bridge", "postgres", __doc__, listeners, argv, options)


if __name__ == "__main__":
    sys.exit(main())
