"""wellknown: the gateway's own public endpoints, on its virtual host (`gateway.host`).

Publishes the development issuer's discovery document and JWKS, so services behind the
gateway can verify the same tokens, a health check, and the approvals page (which then
signs in with a token). These need no token; everything else on the gateway host goes
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
from addons.settings import Settings

PAGE = Path(__file__).parent / "web" / "approvals.html"


class WellKnown:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = ""
        self.documents: dict[str, tuple[str, bytes]] = {}

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require()
        self.host = cfg.gateway_host
        self.documents = {
            "/": ("text/html; charset=utf-8", PAGE.read_bytes()),
            "/healthz": ("application/json", b'{"status": "ok"}'),
        }
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
        document = self.documents.get(f.request.path.split("?")[0])
        if document is None:
            return  # not public: identity and the rest of the chain take it from here
        content_type, content = document
        context.of(f).decision = Decision(effect="allow", reason="the gateway's public endpoints")
        f.response = http.Response.make(200, content, {"content-type": content_type, "cache-control": "no-cache"})
