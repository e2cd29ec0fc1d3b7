"""pg_bridge as a process for tests and benchmarks, and the clients that use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.gateway import ROOT, Gateway
from tests.support.servers import stop_process, wait_listening


class BridgeProcess:
    """`python -m pg_bridge` (or ssh_bridge) for a gateway's configuration, without any
    database secret in its environment (the bridge must never need one)."""

    def __init__(self, gateway: Gateway, port: int, log: Path, module: str = "pg_bridge",
                 proxy: str | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.port = port
        self.log_file = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(gateway.config_file),
             "--proxy", proxy or f"http://127.0.0.1:{gateway.port}"],
            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        wait_listening(port, self.proc, module, log.read_text)

    def environ(self) -> bytes:
        return Path(f"/proc/{self.proc.pid}/environ").read_bytes()

    def stop(self) -> None:
        stop_process(self.proc)


def psql(port: int, token: str, *args: str, database: str = "shop", stdin: str | None = None,
         timeout: float = 60, sslmode: str = "disable") -> subprocess.CompletedProcess:
    """The real psql, logging in to the bridge with `token` as the password."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "PGPASSWORD": token,
           "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        ["psql", "-X", "-v", "ON_ERROR_STOP=1", f"host=127.0.0.1 port={port} dbname={database} user=agent "
         f"sslmode={sslmode}", *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
