"""What ssh_bridge costs: 200 sequential `exec`s over one SSH connection, directly to a real
sshd versus through the bridge and the gateway (`custody run`, the shipped rules/ssh.yaml,
output masked for secrets), in one run, taking turns. Two commands: `echo N` (a bash builtin: the gateway
asks the host nothing before deciding) and `cat /etc/hostname` (a program and a path: the
planner asks the host where `cat` is and what the path really is, one more round trip).
Prints the time per command of each, the ratio and the latency added per command.

    .venv/bin/python bench/ssh.py [--commands 200]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.samples.pki import SigningKey  # noqa: E402
from examples.samples.sshd import SshServer  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.pgbridge import BridgeProcess  # noqa: E402
from tests.support.servers import JwksServer, free_port  # noqa: E402


COMMANDS = {
    "echo N": lambda n: f"echo {n}",
    "cat /etc/hostname": lambda n: "cat /etc/hostname",
}


async def compare(direct, bridged, commands: int, command) -> tuple[list[float], list[float]]:
    """Each command directly and through the bridge in turn, on two open connections, so both
    see the same machine."""
    expected = Path("/etc/hostname").read_text()
    async with await direct() as d, await bridged() as b:
        times: tuple[list[float], list[float]] = ([], [])
        for conn in (d, b):
            await conn.run("true", check=False)  # warm
        for n in range(commands):
            line = command(n)
            for conn, into in zip((d, b), times):
                start = time.perf_counter()
                result = await conn.run(line, check=False)
                into.append(time.perf_counter() - start)
                if result.stdout != (f"{n}\n" if line.startswith("echo") else expected):
                    raise RuntimeError(f"unexpected output {result.stdout!r} / {result.stderr!r}")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commands", type=int, default=200)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="custody-bench-ssh-"))
    sshd = SshServer(work / "sshd")
    key, jwks, gateway, bridge = SigningKey("bench"), JwksServer([]), None, None
    jwks.keys = [key]
    try:
        port = free_port()
        gateway = Gateway(
            work / "gateway",
            connections=[{"name": "prod-web", "kind": "ssh", "hosts": ["web.prod.internal"],
                          "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "known_hosts": str(sshd.known_hosts),
                          "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"},
                          "listen": f"127.0.0.1:{port}"}],
            rules={"ssh.yaml": (ROOT / "rules" / "ssh.yaml").read_text()},
            identity={"issuers": [{"issuer": jwks.issuer, "audience": "custody", "jwks_url": f"{jwks.url}/jwks.json"}]},
            runner="custody",
        ).start()
        bridge = BridgeProcess(gateway, port, work / "bridge.log", module="ssh_bridge")
        token = key.token(jwks.issuer, sub="bench-reader", groups=["ops-readers"], ttl=3600)
        client_key = asyncssh.read_private_key(str(sshd.client_key))

        def direct():
            return asyncssh.connect("127.0.0.1", sshd.port, username=sshd.user, client_keys=[client_key],
                                    known_hosts=str(sshd.known_hosts), agent_path=None, config=None)

        def bridged():
            return asyncssh.connect("127.0.0.1", port, username="agent", password=token, known_hosts=None,
                                    client_keys=None, agent_path=None, config=None)

        print(f"{args.commands} sequential execs of each command over one connection; gateway: custody run, "
              "rules/ssh.yaml (output masked for secrets)\n")
        print(f"{'':28} {'direct p50':>10} {'bridge p50':>10} {'ratio':>6} {'added':>9}")
        for label, command in COMMANDS.items():
            d, b = asyncio.run(compare(direct, bridged, args.commands, command))
            dm, bm = statistics.median(d) * 1000, statistics.median(b) * 1000
            print(f"{label:28} {dm:8.2f}ms {bm:8.2f}ms {bm / dm:6.2f} {bm - dm:+7.2f}ms")
    finally:
        if bridge:
            bridge.stop()
        if gateway:
            gateway.stop()
        jwks.stop()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
