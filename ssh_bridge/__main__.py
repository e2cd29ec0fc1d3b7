"""`python -m ssh_bridge`: serve every ssh connection that has a `listen` address.

The bridge holds no key for the hosts and decides nothing: each command goes to the
gateway (`--proxy`, default $CUSTODY_PROXY or http://127.0.0.1:8080) as an HTTP request
under the agent's own token. Its own host key is the first connection's `host_key`, or
`ssh-bridge-host-key` beside the audit store; it is created once and kept.
"""

from __future__ import annotations

import argparse
import sys

from addons.cli import bridge
from addons.engine import config
from ssh_bridge.server.bridge import Bridge


def listeners(cfg: config.Config, proxy: str, args: argparse.Namespace) -> list[Bridge]:
    by_address: dict[tuple[str, int], list[config.Connection]] = {}
    for c in cfg.connections:
        if c.kind == "ssh" and c.listen:
            by_address.setdefault(c.listen, []).append(c)
    return [Bridge(address, connections, proxy, cfg.ssh_host_key(address)) for address, connections in by_address.items()]


def main(argv: list[str] | None = None) -> int:
    return bridge.main("ssh_bridge", "ssh", __doc__, listeners, argv)


if __name__ == "__main__":
    sys.exit(main())
