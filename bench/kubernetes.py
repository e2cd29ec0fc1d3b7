"""What Custody costs a Kubernetes client: kubectl directly against the API server versus
through the gateway, in one run.

The API server is the test server (examples/samples/kubeapi.py) seeded with 1,000 pods in
one namespace and a few in another. Three ways to reach it, each timed the same way:

- direct:            kubectl (or requests) straight to the API server with its token;
- gateway, masked:   through `mitmdump -s addons/chain.py` with the shipped sample rules
                     (rules/kubernetes.yaml: Secret, env and detected-secret masks on reads);
- gateway, unmasked: the same gateway with a plain allow rule (identity, policy, audit only).

Workloads: `kubectl get pods` on a small namespace (what an agent does most; process start
included), `kubectl get pods` on the 1,000-pod namespace (Table, two pages of 500), and a
raw 1,000-object JSON list fetched with requests (no kubectl start-up in the number).
Prints the median wall time of each and its ratio to direct.

    .venv/bin/python bench/kubernetes.py [--runs 15] [--pods 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.samples.kubeapi import KubeAPI  # noqa: E402
from examples.samples.pki import CA, SigningKey  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.kubectl import clean_env  # noqa: E402
from tests.support.servers import JwksServer  # noqa: E402

SA_TOKEN = "bench-sa-token"
PLAIN_RULES = {"rules": [{"id": "read-anything", "match": {"connection": "prod-k8s", "action": "read"},
                          "effect": "allow"}]}


def interleaved_medians(workloads: dict[str, callable], runs: int) -> dict[str, float]:
    """Median wall time of each callable, run round-robin so background noise (another
    gateway's workers starting, say) falls on all of them alike."""
    for fn in workloads.values():
        fn()  # warm: discovery cache, TLS, connections
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(runs):
        for name, fn in workloads.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def wait_until_masking_is_ready(fetch, timeout: float = 60) -> None:
    """The masked gateway answers 502 until its detectors have loaded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fetch()
            return
        except requests.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def kubeconfig(path: Path, server: str, ca: Path, token: str, proxy: str | None = None) -> Path:
    cluster = {"server": server, "certificate-authority": str(ca)}
    if proxy:
        cluster["proxy-url"] = proxy
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": cluster}], "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "default"}}]}))
    return path


def kubectl(config: Path, cache: Path, *args: str) -> None:
    done = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=120,
                          env=clean_env(KUBECONFIG=str(config), KUBECACHEDIR=str(cache)))
    if done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--pods", type=int, default=1000)
    args = parser.parse_args()
    if not shutil.which("kubectl"):
        sys.exit("bench/kubernetes.py needs kubectl on PATH")
    work = Path(tempfile.mkdtemp(prefix="custody-bench-k8s-"))
    ca = CA(work)
    api = KubeAPI(ca.issue("localhost"), SA_TOKEN)
    api.put("namespaces", {"metadata": {"name": "bench"}})
    for n in range(args.pods):
        api.put("pods", {"metadata": {"name": f"worker-{n:04d}", "namespace": "bench", "labels": {"app": "worker"}},
                         "spec": {"containers": [{"name": "app", "image": "registry.example/worker:1.4",
                                                  "env": [{"name": "MODE", "value": "batch"}]}]}})
    for n in range(5):
        api.put("pods", {"metadata": {"name": f"web-{n}", "namespace": "default"}})
    key = SigningKey("bench")
    jwks = JwksServer([key])
    token = key.token(jwks.issuer, sub="bench-agent", groups=["k8s-readers"], ttl=3600)
    gateways = {}
    for name, rules in (("masked", (ROOT / "rules" / "kubernetes.yaml").read_text()), ("unmasked", PLAIN_RULES)):
        gateways[name] = Gateway(
            work / name,
            connections=[{"name": "prod-k8s", "kind": "kubernetes", "hosts": ["kube.test"], "upstream": api.url,
                          "tls": {"ca_file": str(ca.cert_file)},
                          "credential": {"type": "bearer", "secret": "env:SA"}}],
            rules={"kubernetes.yaml": rules},
            identity={"issuers": [{"issuer": jwks.issuer, "audience": "custody", "jwks_url": f"{jwks.url}/jwks.json"}]},
            env={"SA": SA_TOKEN},
        ).start()
    try:
        routes = {"direct": (kubeconfig(work / "direct.kubeconfig", api.url, ca.cert_file, SA_TOKEN), api.url, None)}
        for name, gw in gateways.items():
            routes[f"gateway, {name}"] = (
                kubeconfig(work / f"{name}.kubeconfig", "https://kube.test", gw.ca, token, gw.proxy_url(None)),
                "https://kube.test", gw)
        lists: dict[str, callable] = {}
        small: dict[str, callable] = {}
        large: dict[str, callable] = {}
        for route, (config, server, gw) in routes.items():
            cache = work / f"cache-{route.replace(', ', '-')}"
            if gw is None:
                session = requests.Session()
                session.trust_env = False
                session.verify, session.headers["Authorization"] = str(ca.cert_file), f"Bearer {SA_TOKEN}"
            else:
                session = gw.session(None)
                session.headers["Authorization"] = f"Bearer {token}"

            def raw_list(session=session, server=server) -> None:
                r = session.get(f"{server}/api/v1/namespaces/bench/pods", timeout=120)
                r.raise_for_status()
                assert len(r.json()["items"]) == args.pods

            lists[route] = raw_list
            small[route] = lambda config=config, cache=cache: kubectl(config, cache, "get", "pods")
            large[route] = lambda config=config, cache=cache: kubectl(config, cache, "get", "pods", "-n", "bench")
        wait_until_masking_is_ready(lists["gateway, masked"])
        few = max(3, args.runs // 3)
        measured = {"kubectl get pods (5 pods)": interleaved_medians(small, args.runs),
                    f"kubectl get pods ({args.pods} pods)": interleaved_medians(large, few),
                    f"GET {args.pods}-pod JSON list": interleaved_medians(lists, few)}
        results = {route: {w: m[route] for w, m in measured.items()} for route in routes}
        size = len(requests.get(f"{api.url}/api/v1/namespaces/bench/pods", verify=str(ca.cert_file),
                                headers={"Authorization": f"Bearer {SA_TOKEN}"}).content)
        print(f"Kubernetes through Custody (median of {args.runs} runs; list of {args.pods} pods = {size / 1e6:.2f} MB; "
              f"{os.cpu_count()} CPUs)")
        workloads = list(results["direct"])
        print(f"{'':34}" + "".join(f"{route:>26}" for route in results))
        for w in workloads:
            base = results["direct"][w]
            cells = [f"{results[r][w] * 1000:9.1f} ms ({results[r][w] / base:4.2f}x)" for r in results]
            print(f"{w:34}" + "".join(f"{c:>26}" for c in cells))
    finally:
        for gw in gateways.values():
            gw.stop()
        api.stop()
        jwks.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
