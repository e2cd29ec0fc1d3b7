"""A soak: N agents for M minutes across HTTP, SQL and SSH, directly and through the gateway
(`custody run`, a real PostgreSQL behind pg_bridge, a real sshd behind ssh_bridge, an HTTP
API), in one run. Agent i speaks HTTP, SQL or SSH (i mod 3), as fast as its answers come.
Prints, per protocol and path: operations, errors (the first of each kind), latency
percentiles, the ratio to direct; the gateway's and bridges' RSS and open descriptors at
the start and end of the load; and the audit store's bytes per recorded request.

    .venv/bin/python bench/soak.py [--agents 10] [--minutes 1] [--baseline-minutes M]

Bounded: the load phases end on time (an agent's operation in flight is its last).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import asyncssh
import psycopg
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.samples.pki import SigningKey  # noqa: E402
from examples.samples.postgres import PostgresServer  # noqa: E402
from examples.samples.sshd import SshServer  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.pgbridge import BridgeProcess  # noqa: E402
from tests.support.servers import JwksServer, Upstream, free_port  # noqa: E402

PROTOCOLS = ("http", "sql", "ssh")
APP_PASSWORD = "soak-app-pw"


class Tally:
    """Latencies and errors of one protocol on one path, shared by its agents."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def add(self, seconds: float | None, error: str = "") -> None:
        with self.lock:
            if error:
                self.errors[error[:120]] += 1
            else:
                self.latencies.append(seconds)


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if len(values) > 1 else \
        (values[0] if values else float("nan"))


class Targets:
    """Where each protocol's agents connect, directly or through the gateway."""

    def __init__(self, http, sql, ssh) -> None:
        self.http, self.sql, self.ssh = http, sql, ssh


def http_agent(n: int, target, until: float, tally: Tally) -> None:
    session = target()
    i = 0
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            r = session.post(f"http://api.test/items/soak-{n}-{i}", json={"n": i}, timeout=30) if i % 2 else \
                session.get(f"http://api.test/items/soak-{n}-{i}", timeout=30)
            tally.add(time.perf_counter() - start, "" if r.status_code == 200 else f"HTTP {r.status_code}")
        except requests.RequestException as e:
            tally.add(None, type(e).__name__)
        i += 1


def sql_agent(n: int, target, until: float, tally: Tally) -> None:
    i = 0
    while time.monotonic() < until:
        try:
            with target() as c:
                while time.monotonic() < until:
                    start = time.perf_counter()
                    if i % 2:
                        c.execute("INSERT INTO soak (agent, n) VALUES (%s, %s)", (n, i))
                    else:
                        c.execute("SELECT count(*) FROM soak WHERE agent = %s", (n,)).fetchone()
                    tally.add(time.perf_counter() - start)
                    i += 1
        except psycopg.Error as e:
            tally.add(None, f"{type(e).__name__} {e.sqlstate or ''}".strip())


def ssh_agent(n: int, target, until: float, tally: Tally) -> None:
    async def run() -> None:
        i = 0
        while time.monotonic() < until:
            try:
                async with await target() as conn:
                    while time.monotonic() < until:
                        start = time.perf_counter()
                        result = await conn.run(f"echo {n}-{i}", check=False, timeout=30)
                        ok = result.stdout == f"{n}-{i}\n"
                        tally.add(time.perf_counter() - start, "" if ok else f"exit {result.exit_status}")
                        i += 1
            except (asyncssh.Error, OSError) as e:
                tally.add(None, type(e).__name__)

    asyncio.run(run())


AGENTS = {"http": http_agent, "sql": sql_agent, "ssh": ssh_agent}


def load(targets: Targets, agents: int, seconds: float) -> dict[str, Tally]:
    tallies = {p: Tally() for p in PROTOCOLS}
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=AGENTS[PROTOCOLS[i % 3]],
                                args=(i, getattr(targets, PROTOCOLS[i % 3]), until, tallies[PROTOCOLS[i % 3]]),
                                daemon=True) for i in range(agents)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    return tallies


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def usage(pid: int) -> tuple[float, int]:
    """RSS (MiB) and open descriptors of a process and its children."""
    rss, fds = 0, 0
    for p in process_tree(pid):
        try:
            rss += int(next(l for l in Path(f"/proc/{p}/status").read_text().splitlines()
                            if l.startswith("VmRSS")).split()[1])
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except (OSError, StopIteration):
            pass
    return rss / 1024, fds


def store_bytes(gateway: Gateway) -> int:
    return sum(p.stat().st_size for p in gateway.dir.glob("audit.db*"))


def report(name: str, tallies: dict[str, Tally], baseline: dict[str, Tally] | None, seconds: float) -> None:
    print(f"\n{name}: {seconds:.0f} s")
    print(f"{'':6} {'ops':>7} {'ops/s':>7} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"
          + (f" {'p50 ratio':>9}" if baseline else ""))
    for p, t in tallies.items():
        lat = [x * 1000 for x in t.latencies]
        line = (f"{p:6} {len(lat):7} {len(lat) / seconds:7.1f} {sum(t.errors.values()):6} {percentile(lat, 50):8.2f} "
                f"{percentile(lat, 95):8.2f} {percentile(lat, 99):8.2f} {max(lat, default=float('nan')):8.2f}")
        if baseline:
            base = [x * 1000 for x in baseline[p].latencies]
            line += f" {percentile(lat, 50) / percentile(base, 50):9.2f}" if base and lat else f" {'-':>9}"
        print(line)
        for error, count in t.errors.most_common(3):
            print(f"       {count} × {error}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--minutes", type=float, default=1.0, help="the load through the gateway")
    p.add_argument("--baseline-minutes", type=float, default=None, help="the same load directly (default: as long)")
    args = p.parse_args()
    seconds = args.minutes * 60
    baseline_seconds = (args.baseline_minutes if args.baseline_minutes is not None else args.minutes) * 60
    work = Path(tempfile.mkdtemp(prefix="custody-bench-soak-"))
    key, jwks, upstream = SigningKey("soak"), JwksServer([]), Upstream()
    jwks.keys = [key]
    pg, sshd = PostgresServer("soak-admin", log_statements=False), SshServer(work / "sshd")
    gateway = pg_bridge = ssh_bridge = None
    try:
        pg.execute("CREATE DATABASE shop")
        pg.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        pg.execute("GRANT ALL ON SCHEMA public TO app", "shop")
        with psycopg.connect(pg.dsn("shop", "app", APP_PASSWORD), autocommit=True) as c:
            c.execute("CREATE TABLE soak (id serial PRIMARY KEY, agent int, n int)")
        pg_port, ssh_port = free_port(), free_port()
        gateway = Gateway(
            work / "gateway",
            connections=[
                {"name": "api", "kind": "http", "hosts": ["api.test"], "upstream": f"http://127.0.0.1:{upstream.port}"},
                {"name": "shop-db", "kind": "postgres", "hosts": ["db.shop.internal"],
                 "upstream": f"postgresql://127.0.0.1:{pg.port}/shop", "listen": f"127.0.0.1:{pg_port}",
                 "credential": {"type": "password", "username": "app", "secret": "env:SOAK_APP_PASSWORD"}},
                {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "listen": f"127.0.0.1:{ssh_port}",
                 "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "known_hosts": str(sshd.known_hosts),
                 "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"}}],
            rules={"soak.yaml": {"rules": [{"id": "soak", "match": {"connection": ["api", "shop-db", "web"],
                                                                    "principal": {"groups": ["soak"]}},
                                            "effect": "allow"}]}},
            identity={"issuers": [{"issuer": jwks.issuer, "audience": "custody", "jwks_url": f"{jwks.url}/jwks.json"}]},
            runner="custody", env={"SOAK_APP_PASSWORD": APP_PASSWORD},
        ).start()
        pg_bridge = BridgeProcess(gateway, pg_port, work / "pg-bridge.log")
        ssh_bridge = BridgeProcess(gateway, ssh_port, work / "ssh-bridge.log", module="ssh_bridge")
        token = key.token(jwks.issuer, sub="soak-agent", groups=["soak"], ttl=3600 + int(seconds))
        client_key = asyncssh.read_private_key(str(sshd.client_key))

        def through_proxy() -> requests.Session:
            s = requests.Session()
            s.trust_env = False
            s.proxies = {"http": gateway.proxy_url(token)}
            return s

        def straight() -> requests.Session:
            s = requests.Session()
            s.trust_env = False
            s.mount("http://api.test", _Rerouted(upstream.port))
            return s

        direct = Targets(
            straight,
            lambda: psycopg.connect(pg.dsn("shop", "app", APP_PASSWORD), autocommit=True),
            lambda: asyncssh.connect("127.0.0.1", sshd.port, username=sshd.user, client_keys=[client_key],
                                     known_hosts=str(sshd.known_hosts), agent_path=None, config=None))
        governed = Targets(
            through_proxy,
            lambda: psycopg.connect(host="127.0.0.1", port=pg_port, dbname="shop", user="agent", password=token,
                                    sslmode="disable", autocommit=True, connect_timeout=10),
            lambda: asyncssh.connect("127.0.0.1", ssh_port, username="agent+web", password=token, known_hosts=None,
                                     client_keys=None, agent_path=None, config=None))

        print(f"soak: {args.agents} agents (HTTP, SQL, SSH in turn), {args.minutes:g} min through the gateway, "
              f"{baseline_seconds / 60:g} min direct; load {os.getloadavg()[0]:.2f} at start, {os.cpu_count()} CPUs")
        baseline = load(direct, args.agents, baseline_seconds)
        report("direct", baseline, None, baseline_seconds)
        load(governed, args.agents, 3)  # warm: masking workers, key fetches, first sessions
        watched = {"gateway": gateway.proc.pid, "pg_bridge": pg_bridge.proc.pid, "ssh_bridge": ssh_bridge.proc.pid}
        before = {n: usage(pid) for n, pid in watched.items()}
        bytes_before, requests_before = store_bytes(gateway), len(gateway.events("kind = 'request'"))
        ours = load(governed, args.agents, seconds)
        after = {n: usage(pid) for n, pid in watched.items()}
        report("through the gateway", ours, baseline, seconds)
        print(f"\n{'process':10} {'RSS MiB start':>13} {'end':>8} {'fds start':>9} {'end':>6}")
        for name in watched:
            print(f"{name:10} {before[name][0]:13.1f} {after[name][0]:8.1f} {before[name][1]:9} {after[name][1]:6}")
        recorded = len(gateway.events("kind = 'request'")) - requests_before
        grown = store_bytes(gateway) - bytes_before
        print(f"\naudit store: {grown / 1e6:.2f} MB for {recorded} requests recorded: "
              f"{grown / max(recorded, 1):.0f} bytes per request (SQLite, WAL included; bodies: full)")
        print(f"load {os.getloadavg()[0]:.2f} at end")
    finally:
        for process in (ssh_bridge, pg_bridge):
            if process:
                process.stop()
        if gateway:
            gateway.stop()
        jwks.stop()
        upstream.stop()
        sshd.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


class _Rerouted(requests.adapters.HTTPAdapter):
    """Direct HTTP to the upstream under the name agents use (api.test)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def send(self, request, **kwargs):
        request.url = request.url.replace("http://api.test", f"http://127.0.0.1:{self.port}", 1)
        return super().send(request, **kwargs)


if __name__ == "__main__":
    main()
