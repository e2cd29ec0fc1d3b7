"""`python -m pg_bridge`: serve every postgres connection that has a `listen` address.

The bridge holds no database credential and decides nothing: each client step goes to
the gateway (`--proxy`, default $CUSTODY_PROXY or http://127.0.0.1:8080) as an HTTP
request under the client's own token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from addons import bridgemain, config
from pg_bridge.server import Bridge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pg_bridge", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the gateway configuration (default: $CUSTODY_CONFIG or ./custody.yaml)")
    p.add_argument("--proxy", default=os.environ.get("CUSTODY_PROXY", "http://127.0.0.1:8080"),
                   help="the gateway's proxy address")
    p.add_argument("--connection", action="append", help="serve only this connection (repeatable)")
    return p.parse_args(argv)


async def serve(cfg: config.Config, proxy: str, only: list[str] | None) -> int:
    wanted = [c for c in cfg.connections if c.kind == "postgres" and c.listen and (not only or c.name in only)]
    if not wanted:
        print("pg_bridge: no postgres connection with a listen address in " + cfg.path, file=sys.stderr)
        return 2
    bridges = [Bridge(c, proxy) for c in wanted]
    for b in bridges:
        await b.start()
        print(f"pg_bridge: {b.connection.name} on {b.connection.listen[0]}:{b.connection.listen[1]} "
              f"-> gateway {proxy}", flush=True)
    return await bridgemain.serve_until_stopped(bridges)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = bridgemain.load("pg_bridge", args.config)  # the bridge holds no credential
    if cfg is None:
        return 2
    return asyncio.run(serve(cfg, args.proxy, args.connection))


if __name__ == "__main__":
    sys.exit(main())
