"""`custody kubeconfig`: kubeconfigs for agents: plain kubectl (or any client-go / Python client) through Custody.

Through the proxy, the cluster's `server:` is the connection's name for it and
`proxy-url` is the gateway: set explicitly, because Go never proxies loopback addresses
and does not read HTTPS_PROXY for a kubeconfig that names its proxy. Direct, `server:` is
the connection's own listener, with `tls-server-name` the connection's host so the
certificate the gateway presents verifies. Either way the trusted CA is the gateway's
(it terminates TLS to see the request), and the user's token is the agent's JWT, which
the gateway verifies, strips and replaces with the credential it holds for the cluster.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from addons.cli.base import CliError, load_config, with_config

if TYPE_CHECKING:
    from addons.engine.config import Connection


class KubeconfigError(ValueError):
    pass


@dataclass(frozen=True)
class Agent:
    """How the agent authenticates: a token, or a file the client re-reads (rotation)."""

    token: str | None = None
    token_file: str | None = None
    namespace: str = "default"
    user: str = "custody-agent"


def server_host(conn: Connection) -> str:
    """The connection's first host as an https authority (port 443 left implicit)."""
    host = conn.hosts[0]
    if host.startswith("*."):
        raise KubeconfigError(f"connection {conn.name!r}: its first host is a wildcard; list the API server's "
                              f"name first")
    return host[:-4] if host.endswith(":443") else host


def build(conn: Connection, agent: Agent, *, ca_file: Path, proxy_url: str | None = None,
          direct: bool = False, embed_ca: bool = False) -> dict[str, Any]:
    if conn.kind != "kubernetes":
        raise KubeconfigError(f"connection {conn.name!r} is a {conn.kind} connection, not kubernetes")
    if not conn.bearer_is_gateway:
        raise KubeconfigError(f"connection {conn.name!r} takes the agent's token in Proxy-Authorization; "
                              f"kubectl sends it as Authorization (remove token_header from the connection)")
    if bool(agent.token) == bool(agent.token_file):
        raise KubeconfigError("give the agent's token (--token) or a file holding it (--token-file), not both")
    if not ca_file.is_file():
        raise KubeconfigError(f"no gateway CA at {ca_file}: start the gateway once (it creates its CA in its "
                              f"confdir) or pass --ca")
    cluster: dict[str, Any] = {}
    if direct:
        if conn.listen is None:
            raise KubeconfigError(f"connection {conn.name!r} has no listen address for direct clients")
        host, port = conn.listen
        cluster["server"] = f"https://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"
        cluster["tls-server-name"] = urlsplit(f"https://{server_host(conn)}").hostname
    else:
        cluster["server"] = f"https://{server_host(conn)}"
        cluster["proxy-url"] = proxy_url or "http://127.0.0.1:8080"
    if embed_ca:
        cluster["certificate-authority-data"] = base64.b64encode(ca_file.read_bytes()).decode()
    else:
        cluster["certificate-authority"] = str(ca_file.resolve())
    user = {"token": agent.token} if agent.token else {"tokenFile": str(Path(agent.token_file).resolve())}
    context = f"{conn.name}-via-custody"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": conn.name, "cluster": cluster}],
        "users": [{"name": agent.user, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": conn.name, "user": agent.user,
                                                    "namespace": agent.namespace}}],
        "current-context": context,
        "preferences": {},
    }


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    import yaml

    cfg = load_config(args)
    conn = next((c for c in cfg.connections if c.name == args.connection), None)
    if conn is None:
        names = ", ".join(c.name for c in cfg.connections if c.kind == "kubernetes") or "none"
        raise CliError(f"no connection {args.connection!r} in {cfg.path} (kubernetes connections: {names})")
    ca = Path(args.ca or Path(args.confdir).expanduser() / "mitmproxy-ca-cert.pem")
    agent = Agent(token=args.token, token_file=args.token_file, namespace=args.namespace)
    try:
        document = build(conn, agent, ca_file=ca, proxy_url=args.proxy_url, direct=args.direct, embed_ca=args.embed_ca)
    except KubeconfigError as e:
        raise CliError(f"custody kubeconfig: {e}") from None
    text = yaml.safe_dump(document, sort_keys=False)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a token
        with os.fdopen(fd, "w") as out:
            out.write(text)
        print(f"wrote {os.path.abspath(args.output)}: KUBECONFIG={args.output} kubectl get pods", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    k = with_config(sub.add_parser("kubeconfig", help="write a kubeconfig that reaches a kubernetes connection "
                                                       "through the gateway"))
    k.add_argument("--connection", required=True, help="the kubernetes connection's name")
    k.add_argument("--token", help="the agent's token, written into the kubeconfig")
    k.add_argument("--token-file", help="a file holding the agent's token (kubectl re-reads it: rotation)")
    k.add_argument("--namespace", default="default")
    k.add_argument("--proxy-url", default=os.environ.get("CUSTODY_PROXY_URL", "http://127.0.0.1:8080"),
                   help="the gateway as agents reach it (default: $CUSTODY_PROXY_URL, else http://127.0.0.1:8080)")
    k.add_argument("--direct", action="store_true", help="no proxy: the connection's own listener (its `listen`)")
    k.add_argument("--confdir", default=os.environ.get("CUSTODY_CONFDIR", "~/.mitmproxy"),
                   help="the gateway's mitmproxy confdir, where its CA is (default: $CUSTODY_CONFDIR, ~/.mitmproxy)")
    k.add_argument("--ca", help="the gateway CA certificate (default: CONFDIR/mitmproxy-ca-cert.pem)")
    k.add_argument("--embed-ca", action="store_true", help="embed the CA (certificate-authority-data)")
    k.add_argument("-o", "--output", help="write here (mode 0600) instead of stdout")
    k.set_defaults(func=cmd_kubeconfig)
