"""Real gateway processes for tests: `mitmdump -s addons/chain.py` or `custody run`,
configured from Python dicts, on an ephemeral port, with real clients to drive them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from addons.engine import config
from addons.engine.store import AuditStore, Store, open_store

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"proxy listening at 127\.0\.0\.1:(\d+)")


class GatewayFailed(RuntimeError):
    pass


class Gateway:
    """One gateway process with its own config, rules, confdir (CA) and audit store."""

    def __init__(
        self,
        directory: Path,
        *,
        connections: list[dict[str, Any]],
        rules: dict[str, Any],
        identity: dict[str, Any],
        runner: str = "mitmdump",
        scripts: tuple[str, ...] = (),
        options: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        store: dict[str, Any] | None = None,
        rules_poll: str = "200ms",
        chain: Path = ROOT / "addons" / "chain.py",
        port: int = 0,
        run_args: tuple[str, ...] = (),
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rules_dir = directory / "rules"
        self.rules_dir.mkdir(exist_ok=True)
        for name, document in rules.items():
            self.write_rules(name, document)
        self.db = directory / "audit.db"
        self.config_file = directory / "custody.yaml"
        self.config = {
            "identity": identity,
            "connections": connections,
            "rules": "rules",
            "rules_poll": rules_poll,
            "store": store if store and "url" in store else {"path": "audit.db", **(store or {})},
        }
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.confdir = directory / "mitmproxy"
        self.ca = self.confdir / "mitmproxy-ca-cert.pem"
        self.runner, self.scripts, self.options, self.chain = runner, scripts, options, chain
        self.env = {**os.environ, **(env or {})}
        self.log_file = directory / "gateway.log"
        self.proc: subprocess.Popen | None = None
        self.run_args = run_args
        """More arguments for `custody run` (say, --workers 2)."""
        self.listen_port = port
        """The proxy port to listen on: 0 for any (a restart then gets another), or a fixed one."""
        self.port = 0

    def write_rules(self, name: str, document: Any) -> None:
        path = self.rules_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
        os.replace(tmp, path)

    def command(self) -> list[str]:
        if self.runner == "custody":
            cmd = [str(BIN / "custody"), "run", "--config", str(self.config_file),
                   "--listen-host", "127.0.0.1", "--listen-port", str(self.listen_port), "--confdir", str(self.confdir)]
            return cmd + list(self.run_args) + [a for o in self.options for a in ("--set", o)]
        cmd = [str(BIN / self.runner)]
        for script in self.scripts:
            cmd += ["-s", script]
        cmd += ["-s", str(self.chain), "--listen-host", "127.0.0.1", "--listen-port", str(self.listen_port),
                "--set", f"confdir={self.confdir}", "--set", f"custody_config={self.config_file}"]
        return cmd + [a for o in self.options for a in ("--set", o)]

    def start(self, timeout: float = 30) -> Gateway:
        self.log_file.write_text("")
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := LISTENING.search(self.log()):
                self.port = int(m.group(1))
                # A startup error makes mitmproxy exit right after it starts listening.
                time.sleep(0.2)
                if self.proc.poll() is None:
                    return self
            if self.proc.poll() is not None:
                raise GatewayFailed(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise GatewayFailed(f"gateway did not start in {timeout}s:\n{self.log()}")

    def run_to_exit(self, timeout: float = 30) -> tuple[int, str]:
        """Start a gateway that is expected to refuse to start; its exit status and output."""
        self.log_file.write_text("")
        done = subprocess.run(self.command(), capture_output=True, text=True, env=self.env, cwd=self.dir, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the process dies as in a crash, with no chance to stop gracefully."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    # clients

    def proxy_url(self, token: str | None) -> str:
        auth = f"agent:{token}@" if token is not None else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    def session(self, token: str | None) -> requests.Session:
        """A requests session that reaches everything through this gateway, trusting its CA."""
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"http": self.proxy_url(token), "https": self.proxy_url(token)}
        s.verify = str(self.ca)
        return s

    def curl(self, token: str | None, url: str, *args: str) -> Reply:
        """Real curl, configured only through the proxy environment and the gateway CA."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(http_proxy=self.proxy_url(token), HTTPS_PROXY=self.proxy_url(token))
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(self.ca), "-D", "-", "-o", "-", *args, url],
            capture_output=True, env=env, timeout=30,
        )
        return Reply.parse(out.stdout, out.returncode, out.stderr.decode(errors="replace"))

    # audit

    def store(self) -> AuditStore:
        """The gateway's audit store: its SQLite file, or the PostgreSQL store it names."""
        if "url" in self.config["store"]:
            return open_store(config.load(str(self.config_file), secrets=False).store)
        return Store(str(self.db))

    def events(self, where: str = "1", args: list | None = None) -> list[dict[str, Any]]:
        store = self.store()
        try:
            return store.where(where, args or [])
        finally:
            store.close()

    def wait_events(self, where: str, args: list | None = None, timeout: float = 10) -> list[dict[str, Any]]:
        """Like events(), for events written just after the client got its answer."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(where, args)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return found

    def event(self, event_id: str) -> dict[str, Any] | None:
        store = self.store()
        try:
            return store.event(event_id)
        finally:
            store.close()

    def custody(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        env = {**self.env, "CUSTODY_CONFIG": str(self.config_file)}
        return subprocess.run([str(BIN / "custody"), *args], capture_output=True, text=True, env=env, check=check, timeout=60)


@dataclass
class Reply:
    """What curl printed: the status of the last response, its headers and body."""

    status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int
    stderr: str

    @classmethod
    def parse(cls, raw: bytes, code: int, stderr: str) -> Reply:
        status, headers, body = 0, {}, b""
        rest = raw
        while rest.startswith(b"HTTP/"):
            head, _, rest = rest.partition(b"\r\n\r\n")
            lines = head.decode(errors="replace").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
            body = rest
        return cls(status, headers, body, code, stderr)

    def json(self) -> Any:
        return json.loads(self.body)
