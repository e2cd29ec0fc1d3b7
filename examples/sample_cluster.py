"""A sample Kubernetes API for the walkthrough: the upstream behind the `prod-k8s` connection.

It is the suite's Kubernetes API test server (examples/samples/kubeapi.py), which answers
kubectl the way a real API server does, seeded with a `shop` namespace, two pods (with a
database password in their environment and a log), a Secret and a ConfigMap. It trusts
only the service-account token in DIR/sa.token, which only the gateway holds, and serves
TLS with a certificate from its own CA in DIR/ca.pem (what the connection pins).

    python examples/sample_cluster.py --port 8443 --dir .custody/sample-cluster
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.samples.kubeapi import KubeAPI  # noqa: E402
from examples.samples.pki import CA  # noqa: E402

DB_PASSWORD = "pg-Shop-2024-x9Lq"


def prepare(directory: Path) -> tuple[tuple[Path, Path], str]:
    """The cluster's CA, server certificate and service-account token (made once)."""
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "sa.token"
    if not token_file.exists():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
    ca = CA(directory, "sample-cluster-ca")
    (directory / "ca.pem").write_bytes(ca.cert_file.read_bytes())
    return ca.issue("localhost"), token_file.read_text().strip()


def seed(api: KubeAPI) -> None:
    api.put("namespaces", {"metadata": {"name": "shop"}})
    env = [{"name": "DB_PASSWORD", "value": DB_PASSWORD}, {"name": "MODE", "value": "live"}]
    for name in ("web-1", "web-2"):
        api.put("pods", {"metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "app", "image": "registry.example/shop-web:2.3", "env": env}]}})
        api.log("shop", name, "listening on :8080", f"connected to postgres://shop:{DB_PASSWORD}@db.shop:5432/shop",
                "GET /cart 200 12ms")
    api.put("secrets", {"metadata": {"name": "db-credentials", "namespace": "shop"},
                        "stringData": {"username": "shop", "password": DB_PASSWORD}})
    api.put("configmaps", {"metadata": {"name": "shop-settings", "namespace": "shop"}, "data": {"currency": "EUR"}})
    api.env = {"DB_PASSWORD": DB_PASSWORD, "MODE": "live"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--dir", type=Path, default=Path(".custody/sample-cluster"))
    args = parser.parse_args()
    tls, token = prepare(args.dir)
    api = KubeAPI(tls, token, port=args.port)
    seed(api)
    print(f"sample cluster on {api.url}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    api.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
