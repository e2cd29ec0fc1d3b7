"""What the governed data path costs: bare mitmdump versus the full Custody chain.

In one run, against the same local upstream and under the same load (wrk, keep-alive,
plain HTTP through the proxy): bare `mitmdump` with no addons of ours, `mitmdump -s
addons/chain.py`, and the lean runner `custody run`. The chain is identity + classify +
policy + recorder + credentials with no masking rules; every request is verified, decided
and written to the audit store (three events) before it goes upstream.

Prints requests/s at `--connections` concurrent connections, p50/p99 latency at one
connection (the latency a single agent sees), and the ratios to bare mitmdump.

    .venv/bin/python bench/http_overhead.py [--duration 10] [--connections 16]

Needs `wrk` (Debian package `wrk`; installed automatically when running as root).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from addons.engine import (
    config,  # noqa: E402
    devissuer,  # noqa: E402
)
from addons.engine.store import Store  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def ready(port: int, workers: int = 1, timeout: float = 60) -> None:
    """Wait until `workers` replicas behind `port` say they are ready on `/readyz` (each fresh
    connection reaches one of them): a gateway still starting burns a core loading its
    masking workers' recognizers, and measuring then understates it."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < workers and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET http://custody.gateway/readyz HTTP/1.1\r\nhost: custody.gateway\r\n"
                             b"connection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                seen.add(json.loads(body)["replica"])
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    if len(seen) < workers:
        sys.exit(f"only {len(seen)} of {workers} workers became ready")


def ensure_tool(name: str, needed_by: str) -> str:
    """The path of a program Debian packages under its own name, installed when missing
    (as root, with apt-get)."""
    if path := shutil.which(name):
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", name], check=False, capture_output=True)
        if path := shutil.which(name):
            return path
    sys.exit(f"{needed_by} needs {name}: apt-get install {name} (or brew install {name})")


def ensure_wrk() -> str:
    return ensure_tool("wrk", "bench/http_overhead.py")


LUA = """
wrk.method = "GET"
wrk.path = "{url}"
wrk.headers["Host"] = "{host}"
{auth}
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %f %f\\n",
    summary.requests, summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.duration, 0, latency:percentile(50), latency:percentile(99)))
end
"""


def load(wrk: str, port: int, url: str, host: str, token: str | None, connections: int, seconds: int) -> dict:
    auth = f'wrk.headers["Proxy-Authorization"] = "Bearer {token}"' if token else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(LUA.format(url=url, host=host, auth=auth))
    out = subprocess.run(
        [wrk, "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "-s", fh.name, f"http://127.0.0.1:{port}"],
        capture_output=True, text=True, check=True,
    )
    os.unlink(fh.name)
    m = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) \d+ ([\d.]+) ([\d.]+)", out.stdout)
    requests, bad_status, socket_errors, micros, p50, p99 = m.groups()
    return {
        "rps": int(requests) / (int(micros) / 1e6),
        "requests": int(requests),
        "errors": int(bad_status) + int(socket_errors),
        "p50_ms": float(p50) / 1000,
        "p99_ms": float(p99) / 1000,
    }


def median(runs: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """The run with the median throughput, and the run with the median p50 latency."""
    by_rps = sorted(runs, key=lambda r: r[0]["rps"])
    by_p50 = sorted(runs, key=lambda r: r[1]["p50_ms"])
    return by_rps[len(runs) // 2][0], by_p50[len(runs) // 2][1]


def setup(workdir: Path, upstream_port: int) -> tuple[Path, str]:
    """A configuration with the development issuer, one connection and an allow rule."""
    (workdir / "rules").mkdir()
    (workdir / "rules" / "bench.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "bench-read", "match": {"connection": "bench", "principal": {"groups": ["bench"]}, "action": "read"}, "effect": "allow"},
        {"id": "bench-admin", "match": {"path": "/admin/**"}, "effect": "deny"},
    ]}))
    (workdir / "bench.token").write_text("upstream-credential")
    cfg = workdir / "custody.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"dev_issuer": {"enabled": True, "key_file": "dev.pem"}},
        "connections": [{"name": "bench", "kind": "http", "hosts": ["bench.test"],
                         "upstream": f"http://127.0.0.1:{upstream_port}",
                         "credential": {"type": "bearer", "secret": "file:bench.token"}}],
        "rules": "rules",
        "store": {"path": "audit.db"},
    }))
    dev = config.load(str(cfg)).identity.dev_issuer
    return cfg, devissuer.mint(dev, "bench-agent", groups=["bench"], ttl=3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per throughput run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="custody-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(upstream_port)],
                                stdout=subprocess.DEVNULL)
    wait_port(upstream_port, upstream)
    cfg, token = setup(work, upstream_port)
    confdir = work / "mitmproxy"
    common = ["-q", "--listen-host", "127.0.0.1", "--set", f"confdir={confdir}"]
    variants = [
        ("bare mitmdump", [BIN / "mitmdump", *common], f"http://127.0.0.1:{upstream_port}/items", f"127.0.0.1:{upstream_port}", None),
        ("mitmdump + chain", [BIN / "mitmdump", *common, "-s", ROOT / "addons" / "chain.py", "--set", f"custody_config={cfg}"],
         "http://bench.test/items", "bench.test", token),
        ("custody run (lean)", [BIN / "custody", "run", "-q", "--listen-host", "127.0.0.1", "--confdir", confdir, "--config", cfg],
         "http://bench.test/items", "bench.test", token),
    ]
    runs: dict[str, list[tuple[dict, dict]]] = {name: [] for name, *_ in variants}
    try:
        for round_ in range(args.rounds):
            for name, cmd, url, host, tok in variants:
                port = free_port()
                proc = subprocess.Popen([str(c) for c in cmd] + ["--listen-port", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
                try:
                    wait_port(port, proc)
                    if tok:
                        ready(port)
                    load(wrk, port, url, host, tok, args.connections, 2)  # warm up
                    throughput = load(wrk, port, url, host, tok, args.connections, args.duration)
                    latency = load(wrk, port, url, host, tok, 1, max(3, args.duration // 2))
                    runs[name].append((throughput, latency))
                finally:
                    proc.terminate()
                    proc.wait(10)
                print(f"  round {round_ + 1}: {name}: {throughput['rps']:.0f} req/s, "
                      f"p50 {latency['p50_ms']:.3f} ms", file=sys.stderr)
    finally:
        upstream.terminate()
    results = {name: median(r) for name, r in runs.items()}
    store = Store(str(work / "audit.db"))
    recorded = len(store.where("kind = 'decision' AND effect = 'allow'", []))
    verified = store.verify()
    store.close()

    base_t, base_l = results["bare mitmdump"]
    print(f"\nHTTP overhead: {args.connections} connections for {args.duration}s (throughput), 1 connection "
          f"(latency); median of {args.rounds} interleaved rounds\n")
    print(f"{'variant':<22} {'req/s':>9} {'ratio':>7} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8}")
    for name, (t, lat) in results.items():
        print(f"{name:<22} {t['rps']:>9.0f} {t['rps'] / base_t['rps']:>6.2f}x {t['errors'] + lat['errors']:>7} "
              f"{lat['p50_ms']:>8.3f} {lat['p99_ms']:>8.3f} {lat['p50_ms'] - base_l['p50_ms']:>+8.3f}")
    print(f"\naudit store: {recorded} allowed requests recorded, chain {'verifies' if verified.ok else 'BROKEN'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
