"""A sample host for the walkthrough: the upstream behind the `prod-web` ssh connection.

A real OpenSSH server (as the tests start one) on 127.0.0.1:PORT that accepts the user
this runs as with the key in DIR/gateway_key, which only the gateway reads; its host key
is pinned in DIR/known_hosts. Keys are made once and kept in DIR.

    python examples/sample_host.py --port 2200 --dir .custody/sample-host
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.sshd import SshServer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=2200)
    p.add_argument("--dir", type=Path, default=Path(".custody/sample-host"))
    args = p.parse_args()
    server = SshServer(args.dir.resolve(), port=args.port, keep=True)
    try:
        (server.dir / "notes.txt").write_text("deploy key: AKIAIOSFODNN7EXAMPLE\nregion: eu-west-1\n")
        print(f"sample host on 127.0.0.1:{args.port} (user {server.user})", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
