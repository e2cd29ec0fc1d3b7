"""A sample host for the walkthrough: the upstream behind the `prod-web` ssh connection.

A real OpenSSH server (as the tests start one) on 127.0.0.1:PORT that accepts USER with
the key in DIR/gateway_key, which only the gateway reads; its host key is pinned in
DIR/known_hosts. Keys are made once and kept in DIR. USER is a separate account (created
here when missing; root only) so that agents on the "host" cannot read the gateway's own
files (its token-signing key, this key) — on a real host, give the gateway its own user.
Several checkouts on one machine share the account, so each one's sshd reads an
authorized_keys file of its own (named after DIR) and never replaces another's.

    sudo python examples/sample_host.py --port 2200 --dir .custody/sample-host --user custody-sample
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.samples.sshd import SshServer, keygen  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=2200)
    p.add_argument("--dir", type=Path, default=Path(".custody/sample-host"))
    p.add_argument("--user", default="custody-sample")
    args = p.parse_args()
    try:
        account = pwd.getpwnam(args.user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", args.user], check=True)
        account = pwd.getpwnam(args.user)
    subprocess.run(["usermod", "--password", "*", args.user], check=True)  # no password, but not locked: keys work
    home = Path(account.pw_dir)
    keygen(args.dir.resolve() / "gateway_key")
    keys = f"authorized_keys.custody-{hashlib.sha256(str(args.dir.resolve()).encode()).hexdigest()[:12]}"
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / keys).write_text((args.dir.resolve() / "gateway_key.pub").read_text())
    (home / "notes.txt").write_text("deploy key: AKIAIOSFODNN7EXAMPLE\nregion: eu-west-1\n")
    for path in (home / ".ssh", home / ".ssh" / keys, home / "notes.txt"):
        os.chown(path, account.pw_uid, account.pw_gid)  # sshd reads the keys as the user
    server = SshServer(args.dir.resolve(), port=args.port, keep=True, user=args.user,
                       authorized_keys=f"%h/.ssh/{keys}")
    try:
        print(f"sample host on 127.0.0.1:{args.port} (user {server.user})", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
