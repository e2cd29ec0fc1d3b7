"""wellknown: the gateway's own public endpoints, on its virtual host (`gateway.host`).

Publishes the development issuer's discovery document and JWKS, so services behind the
gateway can verify the same tokens, and a health check. These need no token; everything
else on the gateway host is 404. A CONNECT to the gateway host is let through so the same
endpoints answer over HTTPS.
"""

from __future__ import annotations

import json

from mitmproxy import http

from addons import context, devissuer, failclosed
from addons.context import Decision
from addons.failclosed import guarded
from addons.settings import Settings


class WellKnown:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = ""
        self.documents: dict[str, dict] = {}

    def configure(self, updated: set[str]) -> None:
        if "custody_config" not in updated:
            return
        cfg = self.settings.require()
        self.host = cfg.gateway_host
        self.documents = {"/healthz": {"status": "ok"}}
        dev = cfg.identity.dev_issuer
        if dev is not None:
            base = dev.issuer.rstrip("/")
            self.documents["/.well-known/jwks.json"] = devissuer.jwks(dev)
            self.documents["/.well-known/openid-configuration"] = {
                "issuer": dev.issuer,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": ["ES256"],
            }

    def _ours(self, f: http.HTTPFlow) -> bool:
        return f.request.host.lower() == self.host and f.request.port in (80, 443)

    @guarded
    def http_connect(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f) or not self._ours(f):
            return
        ctx = context.of(f)
        ctx.decision = Decision(effect="allow", reason="tunnel to the gateway's own endpoints")
        f.response = http.Response.make(200)

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f) or not self._ours(f):
            return
        document = self.documents.get(f.request.path.split("?")[0])
        if document is None or f.request.method not in ("GET", "HEAD"):
            failclosed.refuse(f, 404, f"no such gateway endpoint: {f.request.path}", error="not_found")
            return
        context.of(f).decision = Decision(effect="allow", reason="gateway endpoint")
        f.response = http.Response.make(
            200, json.dumps(document), {"content-type": "application/json", "cache-control": "max-age=300"}
        )
