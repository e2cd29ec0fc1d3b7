"""client: the agent host's side of Custody — one object that gives every tool a way
through the gateway under the agent's token, saying which agent, model, crew run, task and
tool is acting.

    from addons.client import Custody
    custody = Custody.from_env()                 # CUSTODY_PROXY_URL, CUSTODY_CA, token source
    with custody.acting(agent="Inventory analyst", model="gpt-4o", task="restock"):
        custody.session().get("https://sample-api.internal/items")       # requests
        with custody.justify("stock of item 7 is below the reorder point"):
            custody.session().post("https://sample-api.internal/orders", json={...})  # says why
        custody.httpx_client().get(...)                                   # httpx
        custody.live_httpx_client()          # a model SDK's client: fresh token and attributes per call
        custody.pg_connect("127.0.0.1", 15432, "shop").execute("SELECT 1")  # psycopg via pg_bridge
        custody.kubectl("get", "pods", kubeconfig="agent.kubeconfig")     # kubectl
        custody.ssh("uptime", "127.0.0.1", 2222, connection="prod-web")   # ssh_bridge

Tokens come from a client-credentials grant against the configured issuer (refreshed a
minute before they expire), from the development issuer (local use), or are given. The
attributes travel the way each client can carry them: X-Custody-* headers (requests,
httpx), the proxy user name (kubectl and anything that only sets a proxy URL), startup
options (psycopg: `-c custody.task=…`), environment variables (ssh: CUSTODY_TASK). The
gateway records them as *asserted*; verified claims in the token take precedence.
`addons.client.crew` fills them in from CrewAI's own hooks and events.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import os
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from addons.engine.bridge import attribute_headers, header_value
from addons.engine.model import AGENT_ATTRIBUTES, attribute_limit
from addons.engine.oauth import ClientCredentials
from addons.engine.oauth import GrantError as ClientError

__all__ = ["ATTRIBUTES_USER", "ClientCredentials", "ClientError", "Custody", "DevIssuer", "StaticToken"]

ATTRIBUTES_USER = "x-custody."  # the identity addon's proxy-user-name prefix
_acting: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("custody_acting", default={})


class StaticToken:
    def __init__(self, token: str) -> None:
        self.value = token.strip()

    def token(self) -> str:
        return self.value


class DevIssuer:
    """Tokens from the gateway's development issuer (needs its key: local use only)."""

    def __init__(self, config_path: str, subject: str, groups: list[str], ttl: float = 900) -> None:
        from addons.engine import config, devissuer

        cfg = config.load(config_path, secrets=False)
        if cfg.identity.dev_issuer is None:
            raise ClientError(f"{config_path}: the development issuer is not enabled")
        self._mint = lambda: devissuer.mint(cfg.identity.dev_issuer, subject, groups=groups, ttl=ttl)
        self.ttl = ttl
        self._token, self._expires = "", 0.0

    def token(self) -> str:
        if not self._token or self._expires - time.time() < min(60.0, self.ttl / 2):
            self._token, self._expires = self._mint(), time.time() + self.ttl
        return self._token


class Custody:
    def __init__(self, proxy_url: str, ca_file: str, tokens: Any, **attributes: str) -> None:
        parts = urllib.parse.urlsplit(proxy_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"not a proxy URL: {proxy_url!r} (e.g. http://127.0.0.1:8080)")
        self.proxy = f"{parts.scheme}://{parts.hostname}:{parts.port or 8080}"
        self.ca_file = ca_file
        self.tokens = tokens
        self.defaults = {k: v for k, v in attributes.items() if k in AGENT_ATTRIBUTES and v}

    @classmethod
    def from_env(cls, **attributes: str) -> Custody:
        """CUSTODY_PROXY_URL (default http://127.0.0.1:8080), CUSTODY_CA (default
        ~/.mitmproxy/mitmproxy-ca-cert.pem), and the first token source configured:
        CUSTODY_CLIENT_ID + CUSTODY_CLIENT_SECRET + CUSTODY_ISSUER or CUSTODY_TOKEN_URL
        (+ CUSTODY_AUDIENCE, CUSTODY_SCOPE); CUSTODY_TOKEN; or CUSTODY_CONFIG's development
        issuer with CUSTODY_SUBJECT and CUSTODY_GROUPS (comma-separated)."""
        env = os.environ
        if env.get("CUSTODY_CLIENT_ID"):
            tokens: Any = ClientCredentials(env["CUSTODY_CLIENT_ID"], env.get("CUSTODY_CLIENT_SECRET", ""),
                                            token_url=env.get("CUSTODY_TOKEN_URL", ""), issuer=env.get("CUSTODY_ISSUER", ""),
                                            audience=env.get("CUSTODY_AUDIENCE", ""), scope=env.get("CUSTODY_SCOPE", ""))
        elif env.get("CUSTODY_TOKEN"):
            tokens = StaticToken(env["CUSTODY_TOKEN"])
        elif env.get("CUSTODY_CONFIG") and env.get("CUSTODY_SUBJECT"):
            tokens = DevIssuer(env["CUSTODY_CONFIG"], env["CUSTODY_SUBJECT"],
                               [g for g in env.get("CUSTODY_GROUPS", "").split(",") if g])
        else:
            raise ClientError("no token source: set CUSTODY_CLIENT_ID/CUSTODY_CLIENT_SECRET/CUSTODY_ISSUER, "
                              "or CUSTODY_TOKEN, or CUSTODY_CONFIG with CUSTODY_SUBJECT (development issuer)")
        ca = env.get("CUSTODY_CA") or str(Path("~/.mitmproxy/mitmproxy-ca-cert.pem").expanduser())
        return cls(env.get("CUSTODY_PROXY_URL", "http://127.0.0.1:8080"), ca, tokens, **attributes)

    # who is acting

    @contextlib.contextmanager
    def acting(self, **attributes: str) -> Iterator[dict[str, str]]:
        """Within the block (this thread or task), requests say they are made for these."""
        current = {**_acting.get(), **{k: str(v) for k, v in attributes.items() if k in AGENT_ATTRIBUTES and v}}
        reset = _acting.set(current)
        try:
            yield current
        finally:
            _acting.reset(reset)

    def justify(self, why: str):
        """Within the block, requests say why they are made (X-Custody-Justification, and the
        same in every other channel): approvers see it, the record keeps it, and rules whose
        review says `require_justification` refuse requests without one."""
        return self.acting(justification=why)

    @staticmethod
    def set_acting(**attributes: str) -> None:
        """Like acting(), for hooks that cannot wrap the work in a block (CrewAI's tool hook)."""
        _acting.set({k: str(v) for k, v in attributes.items() if k in AGENT_ATTRIBUTES and v})

    def attributes(self) -> dict[str, str]:
        return {**self.defaults, **_acting.get()}

    def headers(self) -> dict[str, str]:
        return attribute_headers(self.attributes())

    def token(self) -> str:
        return self.tokens.token()

    def proxy_url(self, token: bool = True) -> str:
        """The gateway as a proxy URL carrying the attributes (and the token) as its user
        info; without the token and with no attributes, the plain proxy URL (an empty user
        name and password would be credentials that do not verify)."""
        if not token and not self.attributes():
            return self.proxy
        user = ATTRIBUTES_USER + base64.urlsafe_b64encode(
            json.dumps(self.attributes(), separators=(",", ":")).encode()).decode().rstrip("=")
        secret = urllib.parse.quote(self.token(), safe="") if token else ""
        scheme, host = self.proxy.split("://")
        return f"{scheme}://{user}:{secret}@{host}"

    # clients

    def session(self):
        """A requests.Session through the gateway: fresh token and attributes on every request."""
        import requests

        helper = self

        class Session(requests.Session):
            def request(self, method, url, **kwargs):
                url_proxy = helper.proxy_url()
                kwargs["proxies"] = {"http": url_proxy, "https": url_proxy}
                kwargs["headers"] = {**helper.headers(), **(kwargs.get("headers") or {})}
                kwargs.setdefault("verify", helper.ca_file)
                kwargs.setdefault("timeout", 330)  # a held request waits for its approver
                return super().request(method, url, **kwargs)

        s = Session()
        s.trust_env = False
        return s

    def httpx_client(self, **kwargs):
        """An httpx.Client through the gateway for the current attributes (one per tool call:
        the token and attributes are fixed when it is made)."""
        import httpx

        return httpx.Client(proxy=self.proxy_url(), verify=kwargs.pop("verify", self.ca_file), trust_env=False,
                            headers={**self.headers(), **kwargs.pop("headers", {})},
                            timeout=kwargs.pop("timeout", 330), **kwargs)

    def live_httpx_client(self, asynchronous: bool = False, **kwargs):
        """An httpx client (or AsyncClient) through the gateway whose every request carries
        the token and attributes in force when it is sent: for long-lived clients such as a
        model SDK's, made once and used for every call. The token goes as
        `Authorization: Bearer` (the connection's token_header: the default for llm
        connections, whose provider key the gateway holds); the proxy URL carries only the
        attributes of the moment it was made."""
        import httpx

        def fresh(request) -> None:
            request.headers["authorization"] = f"Bearer {self.token()}"
            request.headers.update(self.headers())

        async def afresh(request) -> None:
            fresh(request)

        cls = httpx.AsyncClient if asynchronous else httpx.Client
        return cls(proxy=self.proxy_url(token=False), verify=kwargs.pop("verify", self.ca_file), trust_env=False,
                   timeout=kwargs.pop("timeout", 330), event_hooks={"request": [afresh if asynchronous else fresh]},
                   **kwargs)

    def pg_connect(self, host: str, port: int, dbname: str, **kwargs):
        """psycopg through pg_bridge: the token as the password, attributes as startup options."""
        import psycopg

        options = " ".join(f"-c custody.{k}={_pg_escape(v, attribute_limit(k))}" for k, v in self.attributes().items())
        return psycopg.connect(host=host, port=port, dbname=dbname, user=kwargs.pop("user", "agent"),
                               password=self.token(), options=options, **kwargs)

    def kubectl(self, *args: str, kubeconfig: str, timeout: float = 330) -> subprocess.CompletedProcess:
        """kubectl with `kubeconfig` (from `custody kubeconfig`), its proxy URL carrying the
        attributes and its user the current token; the copy lives only for the call."""
        import yaml

        document = yaml.safe_load(Path(kubeconfig).read_text())
        for cluster in document.get("clusters", []):
            cluster["cluster"]["proxy-url"] = self.proxy_url(token=False)
        for user in document.get("users", []):
            user["user"].pop("tokenFile", None)
            user["user"]["token"] = self.token()
        with tempfile.TemporaryDirectory(prefix="custody-kube-") as tmp:
            path = Path(tmp) / "config"
            path.touch(0o600)
            path.write_text(yaml.safe_dump(document))
            env = {**os.environ, "KUBECONFIG": str(path), "KUBECACHEDIR": str(Path(tmp) / "cache")}
            return subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, timeout=timeout)

    def ssh_env(self) -> dict[str, str]:
        """Environment variables ssh_bridge reads (OpenSSH: -o SetEnv=NAME=VALUE each)."""
        return {f"CUSTODY_{k.upper()}": header_value(v, attribute_limit(k)) for k, v in self.attributes().items()}

    def ssh(self, command: str, host: str, port: int, connection: str, known_hosts: str | None = None,
            timeout: float = 330):
        """Run `command` through ssh_bridge (asyncssh); returns asyncssh's SSHCompletedProcess."""
        import asyncio

        import asyncssh

        async def run():
            async with asyncssh.connect(host, port, username=f"agent+{connection}", password=self.token(),
                                        known_hosts=known_hosts, client_keys=None, agent_path=None,
                                        config=None) as conn:
                return await conn.run(command, env=self.ssh_env(), check=False, timeout=timeout)

        return asyncio.run(run())

    def install(self) -> None:
        """Point tools that only read the environment (curl, git, pip, SDKs) at the gateway,
        with the attributes in force now."""
        url = self.proxy_url()
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
            os.environ[name] = url
        for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
            os.environ[name] = self.ca_file


def _pg_escape(value: str, limit: int) -> str:
    """A value inside libpq `options`: whitespace and backslashes escaped with a backslash."""
    return "".join("\\" + ch if ch in " \\" else ch for ch in header_value(value, limit))
