"""How Custody scales: one and two gateway workers behind a load balancer, on SQLite and on
PostgreSQL.

In one run, through the same haproxy (TCP mode) to the same local upstream, under the same
load (wrk, keep-alive, plain HTTP through the proxy): bare `mitmdump` with no addons of ours
(the baseline: one proxy process), then `custody run` with 1 and with 2 workers
(`--workers`, one port shared with SO_REUSEPORT), first on the SQLite store, then on a
PostgreSQL store (a real server started here, fsync off as in the tests). Every request is
verified, decided and written to the audit store (three events) before it goes upstream.

Prints requests/s at `--connections` concurrent connections, the CPU the gateway's
processes used meanwhile (cores) and so requests/s per core, p50/p99 at one connection,
two workers' throughput over one worker's, and what the PostgreSQL store adds to the p50
over SQLite. Goals: 2 workers >= 1.7x one worker; PostgreSQL <= +0.5 ms at p50. On a
2-core machine the load generator, the balancer, the upstream and PostgreSQL run beside
the gateway: the cores column says how much of the machine the gateway got.

    .venv/bin/python bench/scale.py [--duration 4] [--connections 32]

Needs wrk and haproxy (Debian packages; installed automatically when running as root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from http_overhead import BIN, ensure_tool, ensure_wrk, free_port, load, ready, setup, wait_port  # noqa: E402

from addons.engine.store import open_location  # noqa: E402
from examples.samples.postgres import PostgresServer  # noqa: E402

HAPROXY = """global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend gateway
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    server gateway 127.0.0.1:{backend}
"""


def cpu_seconds(root: int) -> float:
    """User and system CPU time of process `root` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def balanced(haproxy: str, work: Path, backend: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = work / f"haproxy-{backend}.cfg"
    cfg.write_text(HAPROXY.format(port=port, backend=backend))
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def stores(work: Path, upstream_port: int, pg: PostgresServer) -> tuple[dict[str, Path], str]:
    """The same gateway configuration on each store (its own directory, rules and key)."""
    configs, tokens = {}, []
    for name in ("SQLite", "PostgreSQL"):
        directory = work / name
        directory.mkdir()
        cfg, token = setup(directory, upstream_port)
        tokens.append(token)
        if name == "PostgreSQL":
            document = yaml.safe_load(cfg.read_text())
            (directory / "store.password").write_text(pg.password)
            document["store"] = {"url": f"postgresql://{pg.superuser}@127.0.0.1:{pg.port}/bench",
                                 "password": "file:store.password"}
            (directory / "dev.pem").write_bytes((work / "SQLite" / "dev.pem").read_bytes())  # one token for both
            cfg.write_text(yaml.safe_dump(document))
        configs[name] = cfg
    return configs, tokens[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per throughput run")
    parser.add_argument("--latency", type=int, default=3, help="seconds per one-connection latency run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk, haproxy = ensure_wrk(), ensure_tool("haproxy", "bench/scale.py")
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="custody-scale-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(upstream_port)],
                                stdout=subprocess.DEVNULL)
    pg = PostgresServer("bench-store-pw", log_statements=False)
    pg.execute("CREATE DATABASE bench")
    results, counted = {}, {}
    try:
        wait_port(upstream_port, upstream)
        configs, token = stores(work, upstream_port, pg)
        confdir = work / "mitmproxy"
        variants = [("bare mitmdump (baseline)", None, 1)] + [
            (f"custody, {store}, {n} worker{'s' if n > 1 else ''}", store, n)
            for store in ("SQLite", "PostgreSQL") for n in (1, 2)]
        for name, store, workers in variants:
            port = free_port()
            if store is None:
                cmd = [BIN / "mitmdump", "-q", "--listen-host", "127.0.0.1", "--listen-port", port,
                       "--set", f"confdir={confdir}"]
                url, host, tok = f"http://127.0.0.1:{upstream_port}/items", f"127.0.0.1:{upstream_port}", None
            else:
                cmd = [BIN / "custody", "run", "-q", "--listen-host", "127.0.0.1", "--listen-port", port,
                       "--confdir", confdir, "--config", configs[store], "--workers", workers]
                url, host, tok = "http://bench.test/items", "bench.test", token
            log = open(work / f"{port}.log", "wb")
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=work)
            lb, lb_port = None, 0
            try:
                try:
                    wait_port(port, proc)
                except RuntimeError:
                    sys.exit(f"{name} did not start:\n{(work / f'{port}.log').read_text(errors='replace')}")
                if store is not None:
                    ready(port, workers)
                lb, lb_port = balanced(haproxy, work, port)
                load(wrk, lb_port, url, host, tok, args.connections, 1)  # warm up every worker
                before = cpu_seconds(proc.pid)
                throughput = load(wrk, lb_port, url, host, tok, args.connections, args.duration)
                throughput["cores"] = (cpu_seconds(proc.pid) - before) / args.duration
                latency = load(wrk, lb_port, url, host, tok, 1, args.latency)
                results[name] = (throughput, latency)
            finally:
                if lb is not None:
                    lb.terminate()
                proc.terminate()
                proc.wait(30)
            print(f"  {name}: {throughput['rps']:.0f} req/s, p50 {latency['p50_ms']:.3f} ms", file=sys.stderr)
        for store, cfg in configs.items():
            location = str(cfg.parent / "audit.db") if store == "SQLite" else \
                f"postgresql://{pg.superuser}:{pg.password}@127.0.0.1:{pg.port}/bench"
            audit = open_location(location)
            verification = audit.verify()
            writers = {r["replica"] for r in audit.where("kind = 'decision'", [])}
            counted[store] = (verification.count, verification.ok, len(writers))
            audit.close()
    finally:
        upstream.terminate()
        pg.stop()
    load_after = os.getloadavg()

    print(f"\nScale: through haproxy (TCP mode), {args.connections} connections for {args.duration}s (throughput), "
          f"1 connection for {args.latency}s (latency); {os.cpu_count()} cores\n")
    print(f"{'variant':<34} {'req/s':>8} {'x 1 worker':>10} {'cores':>6} {'req/s/core':>10} {'errors':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'+p50 vs SQLite':>15}")
    for name, (t, lat) in results.items():
        store = next((s for s in ("SQLite", "PostgreSQL") if f", {s}, " in name), None)
        one = results.get(f"custody, {store}, 1 worker") if store else None
        sqlite = results.get(f"custody, SQLite, {name.rsplit(', ', 1)[-1]}") if store == "PostgreSQL" else None
        scaled = f"{t['rps'] / one[0]['rps']:.2f}x" if one else "-"
        added = f"{lat['p50_ms'] - sqlite[1]['p50_ms']:+.3f}" if sqlite else "-"
        print(f"{name:<34} {t['rps']:>8.0f} {scaled:>10} {t['cores']:>6.2f} {t['rps'] / t['cores']:>10.0f} "
              f"{t['errors'] + lat['errors']:>7} {lat['p50_ms']:>8.3f} {lat['p99_ms']:>8.3f} {added:>15}")
    for store, (count, ok, writers) in counted.items():
        print(f"\n{store} store: {count} events from {writers} replicas, one chain, "
              f"{'verifies' if ok else 'BROKEN'}", end="")
    print(f"\nload average before {load_before[0]:.2f} / {load_before[1]:.2f}, after {load_after[0]:.2f} / "
          f"{load_after[1]:.2f} (1 / 5 min)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
