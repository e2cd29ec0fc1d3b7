"""What governing MCP costs: tool calls against the sample ticket desk directly, and through
the gateway (`mitmdump -s addons/chain.py`), in one run.

The same server (examples/sample_mcp.py, the official SDK, event-stream answers), the same
client (the official SDK's, one initialized session per worker) and the same call
(`tools/call search_tickets`, allowed by a rule that masks PII, so every answer is parsed,
masked and recorded). Through the gateway every call is identified, classified, decided,
recorded (request, decision, response) and masked before the agent sees it.

Prints tool calls/s at `--sessions` concurrent sessions, p50/p99 latency at one session
(what a single agent waits), and the ratios to calling the server directly.

    .venv/bin/python bench/mcp.py [--duration 10] [--sessions 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# this file's own directory comes first on sys.path, and this file is named like the SDK
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import httpx  # noqa: E402
import yaml  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from http_overhead import free_port, wait_port  # noqa: E402

from addons.engine import config, devissuer  # noqa: E402
from addons.engine.store import Store  # noqa: E402

DESK_TOKEN = "bench-desk-credential"


def desk(work: Path, json_answers: bool) -> tuple[subprocess.Popen, int]:
    (work / "desk.token").write_text(DESK_TOKEN)
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "sample_mcp.py"), "--port", "0",
                             "--token-file", str(work / "desk.token"), *(["--json-response"] if json_answers else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, int(proc.stdout.readline().rsplit(":", 1)[1])


def gateway_config(work: Path, desk_port: int) -> tuple[Path, str]:
    (work / "rules").mkdir()
    (work / "rules" / "bench.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "session", "match": {"connection": "desk", "mcp": {"methods": [
            "initialize", "notifications/*", "tools/list", "custody/listen", "custody/close"]}}, "effect": "allow"},
        {"id": "search", "match": {"connection": "desk", "principal": {"groups": ["bench"]},
                                   "mcp": {"tools": "search_tickets"}}, "effect": "allow", "masks": ["pii"]},
    ]}))
    cfg = work / "custody.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"dev_issuer": {"enabled": True, "key_file": "dev.pem"}},
        "connections": [{"name": "desk", "kind": "mcp", "hosts": ["desk.mcp.test"],
                         "upstream": f"http://127.0.0.1:{desk_port}",
                         "credential": {"type": "bearer", "secret": "file:desk.token"},
                         "mcp": {"tools": {"search_tickets": "read"}}}],
        "rules": "rules",
        "store": {"path": "audit.db"},
    }))
    dev = config.load(str(cfg)).identity.dev_issuer
    return cfg, devissuer.mint(dev, "bench-agent", groups=["bench"], ttl=3600)


async def calls(url: str, client: dict, seconds: float, sessions: int) -> dict:
    """Tool calls from `sessions` concurrent sessions for `seconds`: calls/s and latencies."""
    latencies: list[float] = []
    errors = 0

    async def worker(deadline: float) -> None:
        nonlocal errors
        async with httpx.AsyncClient(trust_env=False, timeout=30, **client) as http:
            async with streamable_http_client(url, http_client=http) as streams:
                async with ClientSession(streams[0], streams[1]) as s:
                    await s.initialize()
                    while time.perf_counter() < deadline:
                        start = time.perf_counter()
                        result = await s.call_tool("search_tickets", {"query": "vpn"})
                        latencies.append(time.perf_counter() - start)
                        errors += bool(result.isError)

    began = time.perf_counter()
    await asyncio.gather(*(worker(began + seconds) for _ in range(sessions)))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {"calls_per_s": len(ordered) / elapsed, "calls": len(ordered), "errors": errors,
            "p50_ms": statistics.median(ordered) * 1000, "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per throughput run")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="the server answers with JSON, not event streams")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="custody-bench-mcp-"))
    server, desk_port = desk(work, args.json)
    cfg, token = gateway_config(work, desk_port)
    port = free_port()
    gw = subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={work / 'mitmproxy'}", "-s", str(ROOT / "addons" / "chain.py"),
                           "--set", f"custody_config={cfg}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          cwd=work)
    variants = {
        "server directly": (f"http://127.0.0.1:{desk_port}/mcp", {"headers": {"authorization": f"Bearer {DESK_TOKEN}"}}),
        "through Custody": ("http://desk.mcp.test/mcp", {"proxy": f"http://agent:{token}@127.0.0.1:{port}"}),
    }
    results = {}
    try:
        wait_port(port, gw)
        time.sleep(2)  # the masking workers start
        for name, (url, client) in variants.items():
            asyncio.run(calls(url, client, 2, args.sessions))  # warm up
            throughput = asyncio.run(calls(url, client, args.duration, args.sessions))
            latency = asyncio.run(calls(url, client, max(3.0, args.duration / 2), 1))
            results[name] = (throughput, latency)
            print(f"  {name}: {throughput['calls_per_s']:.0f} calls/s, p50 {latency['p50_ms']:.2f} ms", file=sys.stderr)
    finally:
        gw.terminate()
        gw.wait(10)
        server.terminate()
    store = Store(str(work / "audit.db"))
    recorded = store.db.execute("SELECT count(*) FROM events WHERE kind = 'decision' AND effect = 'allow' "
                                "AND resource = 'search_tickets'").fetchone()[0]
    verified = store.verify()
    store.close()
    base_t, base_l = results["server directly"]
    print(f"\nMCP tool calls ({'JSON' if args.json else 'event-stream'} answers): {args.sessions} sessions for "
          f"{args.duration:g}s (throughput), 1 session (latency)\n")
    print(f"{'variant':<18} {'calls/s':>9} {'ratio':>7} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8}")
    for name, (t, lat) in results.items():
        print(f"{name:<18} {t['calls_per_s']:>9.0f} {t['calls_per_s'] / base_t['calls_per_s']:>6.2f}x "
              f"{t['errors'] + lat['errors']:>7} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f} "
              f"{lat['p50_ms'] - base_l['p50_ms']:>+8.2f}")
    print(f"\naudit store: {recorded} allowed tool calls recorded, chain {'verifies' if verified.ok else 'BROKEN'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
