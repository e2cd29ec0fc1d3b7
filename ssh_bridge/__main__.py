"""`python -m ssh_bridge`: serve every ssh connection that has a `listen` address.

The bridge holds no key for the hosts and decides nothing: each command goes to the
gateway (`--proxy`, default $CUSTODY_PROXY or http://127.0.0.1:8080) as an HTTP request
under the agent's own token. Its own host key is the first connection's `host_key`, or
`ssh-bridge-host-key` beside the audit store; it is created once and kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from addons import bridgemain, config
from ssh_bridge.server import Bridge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ssh_bridge", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the gateway configuration (default: $CUSTODY_CONFIG or ./custody.yaml)")
    p.add_argument("--proxy", default=os.environ.get("CUSTODY_PROXY", "http://127.0.0.1:8080"),
                   help="the gateway's proxy address")
    return p.parse_args(argv)


async def serve(cfg: config.Config, proxy: str) -> int:
    by_address: dict[tuple[str, int], list] = {}
    for c in cfg.connections:
        if c.kind == "ssh" and c.listen:
            by_address.setdefault(c.listen, []).append(c)
    if not by_address:
        print("ssh_bridge: no ssh connection with a listen address in " + cfg.path, file=sys.stderr)
        return 2
    bridges = []
    for address, connections in by_address.items():
        key = Path(connections[0].host_key or Path(cfg.store.path).parent / "ssh-bridge-host-key")
        bridge = Bridge(address, connections, proxy, key)
        await bridge.start()
        bridges.append(bridge)
        print(f"ssh_bridge: {', '.join(c.name for c in connections)} on {address[0]}:{address[1]} "
              f"-> gateway {proxy}", flush=True)
    return await bridgemain.serve_until_stopped(bridges)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = bridgemain.load("ssh_bridge", args.config)  # the bridge holds no credential
    if cfg is None:
        return 2
    return asyncio.run(serve(cfg, args.proxy))


if __name__ == "__main__":
    sys.exit(main())
