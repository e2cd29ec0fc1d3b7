"""What governing model traffic costs: model calls and the requests they ask for, directly
and through the gateway (`mitmdump -s addons/chain.py`), in one run.

The same model server (examples/sample_model.py, the stand-in over HTTPS), the same client
(the openai SDK, one keep-alive client per variant) and the same call (Chat Completions,
"Task key: fetch": one function call). Through the gateway every model call is identified,
classified, decided, its prompt masked (`secrets` rule masks) before it leaves, its
completion read (whole, or event by event when streamed), masked, recorded and its tool
call remembered. Then the request that tool call asked for (GET /items on a local API,
bench/upstream.py) is matched against the principal's remembered tool calls (by then the
ledger holds the last 256 of them) and recorded with its provenance, beside the same
request made directly. A request no model asked for misses the ledger, so the principal's
tool calls are read from the audit store too (what a request costs that reaches another
replica than its model call): the same GET with a query no tool call named.

Prints p50/p99 latency per call (sequential: what one agent waits) and what the gateway adds.

    .venv/bin/python bench/llm.py [--calls 150]
"""

from __future__ import annotations

import argparse
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

sys.path[:0] = [str(ROOT)]

from http_overhead import free_port, wait_port  # noqa: E402

from addons.engine import config, devissuer  # noqa: E402
from addons.engine.store import Store  # noqa: E402

MODEL = "custody-standin/scripted-1"
TOOLS = [{"type": "function", "function": {"name": "inventory_api", "parameters": {"type": "object"}}}]


def model_server(work: Path) -> tuple[subprocess.Popen, int]:
    (work / "plans.json").write_text(json.dumps({"fetch": [["inventory_api", {"method": "GET", "path": "/items"}]]}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "sample_model.py"), "--port", "0",
                             "--dir", str(work / "model"), "--plans", str(work / "plans.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, int(proc.stdout.readline().rsplit(":", 1)[1])


def gateway_config(work: Path, model_port: int, api_port: int) -> tuple[Path, str]:
    (work / "rules").mkdir()
    (work / "rules" / "bench.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "model", "match": {"connection": "models", "llm": {"models": "custody-standin/*", "max_tokens": 512}},
         "effect": "allow", "masks": ["secrets"]},
        {"id": "asked-for", "match": {"connection": "api", "action": "read", "provenance": "required"},
         "effect": "allow"},
        {"id": "unasked", "match": {"connection": "api", "action": "read", "provenance": "none"}, "effect": "allow"},
    ]}))
    cfg = work / "custody.yaml"
    cfg.write_text(yaml.safe_dump({
        "identity": {"dev_issuer": {"enabled": True, "key_file": "dev.pem"}},
        "connections": [
            {"name": "models", "kind": "llm", "hosts": ["models.test"], "upstream": f"https://localhost:{model_port}",
             "tls": {"ca_file": str(work / "model" / "ca.pem")},
             "credential": {"type": "bearer", "secret": f"file:{work / 'model' / 'api.key'}"}, "llm": {"api": "openai"}},
            {"name": "api", "kind": "http", "hosts": ["api.test"], "upstream": f"http://127.0.0.1:{api_port}"}],
        "rules": "rules",
        "store": {"path": "audit.db"},
    }))
    dev = config.load(str(cfg)).identity.dev_issuer
    return cfg, devissuer.mint(dev, "bench-agent", groups=["bench"], ttl=3600)


def ready(port: int, within: float = 60) -> None:
    """Wait until the gateway says it is ready (`/readyz`: the store, the rules and the
    masking workers, which start in the background)."""
    deadline = time.monotonic() + within
    with httpx.Client(proxy=f"http://127.0.0.1:{port}", trust_env=False) as http:
        while http.get("http://custody.gateway/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not get ready")
            time.sleep(0.2)


def timed(fn, n: int) -> dict:
    fn()  # warm up: connections, caches
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - start)
    ordered = sorted(latencies)
    return {"p50_ms": statistics.median(ordered) * 1000, "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000}


def model_call(client: openai.OpenAI, stream: bool):
    def call() -> None:
        kw = {"model": MODEL, "max_tokens": 200, "tools": TOOLS,
              "messages": [{"role": "user", "content": "Task key: fetch"}]}
        if stream:
            with client.chat.completions.stream(**kw, stream_options={"include_usage": True}) as s:
                calls = s.get_final_completion().choices[0].message.tool_calls
        else:
            calls = client.chat.completions.create(**kw).choices[0].message.tool_calls
        assert calls and calls[0].function.name == "inventory_api"
    return call


def request(http: httpx.Client, url: str, before=None):
    def call() -> None:
        if before is not None:
            before()
        assert http.get(url).status_code == 200
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150, help="calls per variant")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="custody-bench-llm-"))
    model, model_port = model_server(work)
    api_port = free_port()
    api = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port", str(api_port)],
                           stdout=subprocess.DEVNULL)
    cfg, token = gateway_config(work, model_port, api_port)
    port = free_port()
    gw = subprocess.Popen([str(BIN / "mitmdump"), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
                           "--set", f"confdir={work / 'mitmproxy'}", "-s", str(ROOT / "addons" / "chain.py"),
                           "--set", f"custody_config={cfg}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          cwd=work)
    results: dict[str, dict] = {}
    try:
        wait_port(port, gw)
        wait_port(api_port, api)
        ready(port)
        key = (work / "model" / "api.key").read_text().strip()
        model_tls = ssl.create_default_context(cafile=str(work / "model" / "ca.pem"))
        gateway_tls = ssl.create_default_context(cafile=str(work / "mitmproxy" / "mitmproxy-ca-cert.pem"))
        direct = openai.OpenAI(base_url=f"https://localhost:{model_port}/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(verify=model_tls, trust_env=False))
        proxied = openai.OpenAI(base_url="https://models.test/v1", api_key=token, max_retries=0,
                                http_client=httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=gateway_tls,
                                                         trust_env=False))
        for stream in (False, True):
            name = "streamed" if stream else "whole"
            results[f"model call, {name}: directly"] = timed(model_call(direct, stream), args.calls)
            results[f"model call, {name}: through Custody"] = timed(model_call(proxied, stream), args.calls)
        plain = httpx.Client(trust_env=False)
        governed = httpx.Client(proxy=f"http://agent:{token}@127.0.0.1:{port}", trust_env=False)
        results["asked-for request: directly"] = timed(request(plain, f"http://127.0.0.1:{api_port}/items"), args.calls)
        results["asked-for request: through Custody"] = timed(request(governed, "http://api.test/items"), args.calls)
        results["unasked request (store read): directly"] = timed(
            request(plain, f"http://127.0.0.1:{api_port}/items?unasked=1"), args.calls)
        results["unasked request (store read): through Custody"] = timed(
            request(governed, "http://api.test/items?unasked=1"), args.calls)
    finally:
        gw.terminate()
        gw.wait(10)
        model.terminate()
        api.terminate()
    store = Store(str(work / "audit.db"))
    matched = len(store.where("kind = 'decision' AND connection = 'api' AND "
                              "json_extract(operation, '$.details.provenance.match') = 'exact'", []))
    unasked = len(store.where("kind = 'decision' AND connection = 'api' AND "
                              "json_extract(operation, '$.details.provenance.match') = 'none'", []))
    completions = len(store.where("kind = 'completion'", []))
    verified = store.verify()
    store.close()
    print(f"\nmodel calls and the requests they ask for: {args.calls} sequential calls per variant "
          "(prompts and completions masked with `secrets`)\n")
    print(f"{'variant':<52} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'ratio':>7}")
    for name, r in results.items():
        base = results[name.split(":")[0] + ": directly"]
        print(f"{name:<52} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p50_ms'] - base['p50_ms']:>+8.2f} "
              f"{r['p50_ms'] / base['p50_ms']:>6.2f}x")
    print(f"\naudit store: {completions} completions, {matched} requests with exact provenance, {unasked} with none, "
          f"chain {'verifies' if verified.ok else 'BROKEN'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
