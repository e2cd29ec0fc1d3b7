"""What pg_bridge costs a PostgreSQL client: pgbench directly against the server versus
through the bridge and the gateway, in one run.

A real PostgreSQL (initdb/pg_ctl) with pgbench's tables (scale 1), the gateway as it runs
in production (`custody run`) with the shipped sample rules (rules/postgres.yaml), and
pg_bridge. pgbench runs without vacuum (-n), 4 clients, for --seconds, in simple and in
extended protocol mode, directly and through the bridge:

    select-only   (-S) as an analyst: reads masked (credential columns, PII and secrets)
    tpcb-like     (-b tpcb-like) as an application writer: per transaction, three UPDATEs,
                  a SELECT and an INSERT between BEGIN and END; each write's rows estimated
                  by the planner (EXPLAIN, under a savepoint) for the review rules

Prints tps and the p50 latency of each (from pgbench's per-transaction log), the ratio,
and the latency added per statement at p50. A single-client select-only run of each mode
follows: with 4 clients on a small machine the p50 includes queueing at the gateway; with
one it is the cost of one statement. Goals: at most 1 ms added per statement with one
client, at least 2,000 statements/s per gateway worker with four.

    .venv/bin/python bench/pg.py [--seconds 30] [--clients 4] [--workloads select-only,tpcb-like]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.samples.pki import SigningKey  # noqa: E402
from examples.samples.postgres import PostgresServer  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.pgbridge import BridgeProcess  # noqa: E402
from tests.support.servers import JwksServer, free_port  # noqa: E402

APP_PASSWORD = "bench-app-password"


WORKLOADS = {"select-only": (["-S"], 1), "tpcb-like": (["-b", "tpcb-like"], 7)}
"""pgbench's options for each workload, and the statements of one of its transactions."""


def pgbench(server: PostgresServer, dsn: str, password: str, workload: str, mode: str, clients: int, seconds: int,
            logdir: Path) -> tuple[float, float]:
    """(tps, p50 latency in ms) of one pgbench run."""
    for old in glob.glob(str(logdir / "pgbench_log*")):
        os.unlink(old)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "PGPASSWORD": password}
    done = subprocess.run([str(server.bin / "pgbench"), "-n", *WORKLOADS[workload][0], "-M", mode,
                           "-c", str(clients), "-j", "2",
                           "-T", str(seconds), "-l", "--log-prefix", str(logdir / "pgbench_log"), dsn],
                          capture_output=True, text=True, env=env, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stdout}{done.stderr}")
    tps = float(re.search(r"tps = ([0-9.]+)", done.stdout).group(1))
    latencies = [int(line.split()[2]) for f in glob.glob(str(logdir / "pgbench_log*"))
                 for line in open(f) if line.strip()]
    return tps, statistics.median(latencies) / 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workloads", default="select-only,tpcb-like")
    args = p.parse_args()
    workloads = args.workloads.split(",")
    work = Path(tempfile.mkdtemp(prefix="custody-bench-pg-"))
    server = PostgresServer("bench-admin", log_statements=False)
    key, jwks = SigningKey("bench"), None
    gateway = bridge = None
    try:
        server.execute("CREATE DATABASE shop")
        server.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        server.execute("ALTER DATABASE shop OWNER TO app")
        init = subprocess.run([str(server.bin / "pgbench"), "-i", "-s", "1", "-q",
                               server.dsn("shop", "app", APP_PASSWORD)], capture_output=True, text=True,
                              env={**os.environ, "PGPASSWORD": APP_PASSWORD})
        if init.returncode != 0:
            raise RuntimeError(init.stderr)
        jwks = JwksServer([key])
        port = free_port()
        gateway = Gateway(
            work / "gateway",
            connections=[{"name": "prod-db", "kind": "postgres", "hosts": ["db.prod.internal"],
                          "upstream": f"postgresql://127.0.0.1:{server.port}/shop",
                          "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"},
                          "listen": f"127.0.0.1:{port}"}],
            rules={"postgres.yaml": (ROOT / "rules" / "postgres.yaml").read_text()},
            identity={"issuers": [{"issuer": jwks.issuer, "audience": "custody",
                                   "jwks_url": f"{jwks.url}/jwks.json"}]},
            env={"PG_APP_PASSWORD": APP_PASSWORD},
            runner="custody",
        ).start()
        bridge = BridgeProcess(gateway, port, work / "bridge.log")
        tokens = {"select-only": key.token(jwks.issuer, sub="bench-analyst", groups=["analysts"], ttl=3600),
                  "tpcb-like": key.token(jwks.issuer, sub="bench-writer", groups=["app-writers"], ttl=3600)}
        direct = server.dsn("shop", "app", APP_PASSWORD).replace(f"password={APP_PASSWORD}", "").strip()
        bridged = f"host=127.0.0.1 port={port} dbname=shop user=agent sslmode=disable"
        print(f"pgbench, {args.clients} clients, {args.seconds} s each; gateway: custody run, rules/postgres.yaml\n")
        print(f"{'workload':12} {'mode':10} {'clients':>7} {'':8} {'tps':>10} {'p50 ms':>8}")
        runs = [(w, args.clients, args.seconds) for w in workloads]
        if "select-only" in workloads:
            runs.append(("select-only", 1, max(5, args.seconds // 3)))
        for workload, clients, seconds in runs:
            statements = WORKLOADS[workload][1]
            for mode in ("simple", "extended"):
                d_tps, d_p50 = pgbench(server, direct, APP_PASSWORD, workload, mode, clients, seconds, work)
                b_tps, b_p50 = pgbench(server, bridged, tokens[workload], workload, mode, clients, seconds, work)
                print(f"{workload:12} {mode:10} {clients:7} {'direct':8} {d_tps:10.0f} {d_p50:8.2f}")
                print(f"{'':12} {'':10} {'':7} {'bridge':8} {b_tps:10.0f} {b_p50:8.2f}")
                print(f"{'':12} {'':10} {'':7} {'ratio':8} {b_tps / d_tps:10.3f} {b_p50 / d_p50:8.1f}   "
                      f"added per statement at p50: {(b_p50 - d_p50) / statements:.2f} ms"
                      f"{' (goal <= 1 ms)' if clients == 1 else f', {b_tps * statements:.0f} statements/s (goal >= 2000)'}",
                      flush=True)
    finally:
        if bridge:
            bridge.stop()
        if gateway:
            gateway.stop()
        if jwks:
            jwks.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
