"""wellknown: the gateway's own public endpoints, on its virtual host (`gateway.host`).

Publishes the development issuer's discovery document and JWKS, so services behind the
gateway can verify the same tokens, a liveness check (`/healthz`: the process answers) and a
readiness check (`/readyz`: 503 with the reasons while the audit store is unavailable, the
rules or masking are not ready, or the gateway is stopping; what a load balancer asks),
both naming the replica that answered, the approvals page (which then signs in with SSO,
addons/signin.py, or a token), and the ssh bridges' host keys as a known_hosts file, so an agent that
trusts the gateway (its CA) trusts the bridges without a first-time prompt
(`custody ssh-config` fetches it). These need no token; everything else on the gateway host goes
through the chain to the approvals API.
"""

from __future__ import annotations

import json
from pathlib import Path

from mitmproxy import http

from addons import context, failclosed
from addons.engine import devissuer
from addons.engine.model import Decision
from addons.failclosed import guarded
from addons.replica import Replica
from addons.settings import Settings

PAGE = Path(__file__).parent / "web" / "approvals.html"
KNOWN_HOSTS = "/.well-known/ssh_known_hosts"
READY = "/readyz"
PROBES = ("/healthz", READY)
PROBE = "custody-probe"
"""flow.metadata: a health probe, which the recorder leaves out of the audit log."""


def ssh_known_hosts(bridges: list[tuple[tuple[str, int], str]]) -> bytes:
    """`[host]:port key` for every ssh bridge whose host key exists (read each time: a bridge
    creates its key when it first starts, which may be after the gateway)."""
    import asyncssh

    lines = []
    for (host, port), key_file in bridges:
        try:
            public = asyncssh.read_private_key(key_file).export_public_key("openssh").decode().strip()
        except (OSError, asyncssh.KeyImportError):
            continue  # not created yet: no line, so clients cannot trust a key nobody made
        lines.append(f"[{host}]:{port} {public}\n")
    return "".join(lines).encode()


class WellKnown:
    def __init__(self, settings: Settings, replica: Replica) -> None:
        self.settings = settings
        self.replica = replica
        self.host = ""
        self.documents: dict[str, tuple[str, bytes]] = {}
        self.known_hosts: list[tuple[tuple[str, int], str]] = []

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require()
        self.host = cfg.gateway_host
        self.documents = {
            "/": ("text/html; charset=utf-8", PAGE.read_bytes()),
            "/healthz": ("application/json", b'{"status": "ok"}'),
        }
        self.known_hosts = sorted({(c.listen, str(cfg.ssh_host_key(c.listen)))
                                   for c in cfg.connections if c.kind == "ssh" and c.listen})
        dev = cfg.identity.dev_issuer
        if dev is not None:
            base = dev.issuer.rstrip("/")
            discovery = {
                "issuer": dev.issuer,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": ["ES256"],
            }
            self.documents["/.well-known/jwks.json"] = ("application/json", json.dumps(devissuer.jwks(dev)).encode())
            self.documents["/.well-known/openid-configuration"] = ("application/json", json.dumps(discovery).encode())

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f) or f.request.host.lower() != self.host or f.request.method not in ("GET", "HEAD"):
            return
        path = f.request.path.split("?")[0]
        status = 200
        if path == READY:
            problems = self.replica.problems()
            status = 503 if problems else 200
            document = ("application/json", json.dumps({"status": "unready" if problems else "ready",
                                                        "replica": self.replica.log.replica.id,
                                                        "problems": problems}).encode())
        elif path == KNOWN_HOSTS:
            document = ("text/plain", ssh_known_hosts(self.known_hosts))
        else:
            document = self.documents.get(path)
        if document is None:
            return  # not public: identity and the rest of the chain take it from here
        content_type, content = document
        if path in PROBES:
            f.metadata[PROBE] = True
        context.of(f).decision = Decision(effect="allow", reason="the gateway's public endpoints")
        f.response = http.Response.make(status, content, {"content-type": content_type, "cache-control": "no-cache",
                                                          "x-custody-replica": self.replica.log.replica.id})
