"""Shared fixtures: a test CA, token signing keys behind a real JWKS endpoint, real upstream
servers, and the standard gateway configuration most end-to-end tests run against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.samples.pki import CA, SigningKey
from tests.support.gateway import Gateway
from tests.support.servers import JwksServer, Upstream

API_TOKEN = "upstream-secret-4f1c"  # the credential the gateway holds for the `api` connection
SECURE_KEY = "secure-api-key-77aa"


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> CA:
    return CA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def keys() -> dict[str, SigningKey]:
    return {"rsa": SigningKey("rsa-1", "RS256"), "ec": SigningKey("ec-1", "ES256"), "next": SigningKey("rsa-2", "RS256")}


@pytest.fixture(scope="session")
def jwks(keys) -> JwksServer:
    server = JwksServer([keys["rsa"], keys["ec"]])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_upstream(ca) -> Upstream:
    server = Upstream(tls=ca.issue("localhost"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def other_tls_upstream(ca) -> Upstream:
    server = Upstream(tls=ca.issue("localhost"))
    yield server
    server.stop()


def standard_connections(upstream: Upstream, tls_upstream: Upstream, ca: CA, secret_dir: Path,
                         other_tls_upstream: Upstream) -> list[dict]:
    (secret_dir / "secure.key").write_text(SECURE_KEY + "\n")
    return [
        {
            "name": "api",
            "kind": "http",
            "hosts": ["api.test", "api.test:8080"],
            "upstream": f"http://127.0.0.1:{upstream.port}",
            "credential": {"type": "bearer", "secret": "env:TEST_API_TOKEN"},
        },
        {
            "name": "secure",
            "kind": "http",
            "hosts": ["secure.test"],
            "upstream": f"https://localhost:{tls_upstream.port}",
            "tls": {"ca_file": str(ca.cert_file)},
            "credential": {"type": "header", "header": "X-Api-Key", "secret": f"file:{secret_dir / 'secure.key'}"},
        },
        {
            "name": "mispinned",
            "kind": "http",
            "hosts": ["mispinned.test"],
            "upstream": f"https://127.0.0.1:{tls_upstream.port}",
            "tls": {"ca_file": str(CA(secret_dir, "some-other-ca").cert_file)},
        },
        {
            "name": "unpinned",
            "kind": "http",
            "hosts": ["unpinned.test"],
            "upstream": f"https://localhost:{other_tls_upstream.port}",
        },
        {
            "name": "direct",  # a registered host that really resolves: nothing virtual about it
            "kind": "http",
            "hosts": [f"127.0.0.1:{upstream.port}"],
        },
        {
            "name": "resolver",  # port 53: mitmproxy would speak DNS here, ungoverned
            "kind": "http",
            "hosts": ["127.0.0.1:53"],
        },
        {
            "name": "kube",
            "kind": "http",
            "hosts": ["kube.test"],
            "upstream": f"http://127.0.0.1:{upstream.port}",
            "token_header": "authorization",
            "credential": {"type": "basic", "username": "svc", "secret": "env:TEST_API_TOKEN"},
        },
    ]


STANDARD_RULES = {
    "access.yaml": {
        "rules": [
            {"id": "analysts-read", "match": {"connection": ["api", "secure", "kube", "mispinned", "unpinned", "direct"], "principal": {"groups": ["analysts"]}, "action": "read"}, "effect": "allow"},
            {"id": "writers-write", "match": {"connection": "api", "principal": {"groups": ["writers"]}, "action": ["write", "delete"]}, "effect": "allow"},
        ]
    },
    "guards.yaml": {
        "rules": [
            {"id": "admin-denied", "match": {"path": "/admin/**"}, "effect": "deny", "reason": "admin endpoints are off-limits"},
            {"id": "big-refunds-denied", "match": {"connection": "api", "method": "POST", "path": "/refunds",
                                                   "body": [{"path": "$.amount", "op": "gt", "value": 1000}]},
             "effect": "deny", "reason": "refunds over 1000 are denied"},
            {"id": "orders-reviewed", "match": {"connection": "api", "path": "/orders", "action": "write"},
             "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "1s"}},
        ]
    },
}


def standard_identity(jwks: JwksServer, **overrides) -> dict:
    issuer = {"issuer": jwks.issuer, "audience": "custody", "jwks_url": f"{jwks.url}/jwks.json", "leeway": 5}
    return {"issuers": [issuer], "jwks_min_interval": "200ms", **overrides}


@dataclass
class Servers:
    """Everything a standard gateway talks to."""

    ca: CA
    jwks: JwksServer
    upstream: Upstream
    tls_upstream: Upstream
    other_tls_upstream: Upstream


@pytest.fixture(scope="session")
def servers(ca, jwks, upstream, tls_upstream, other_tls_upstream) -> Servers:
    return Servers(ca, jwks, upstream, tls_upstream, other_tls_upstream)


def standard_gateway(directory: Path, servers: Servers, **overrides) -> Gateway:
    """A gateway (not started) with the standard connections, rules and identity."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = {
        "connections": standard_connections(servers.upstream, servers.tls_upstream, servers.ca, directory,
                                            servers.other_tls_upstream),
        "rules": STANDARD_RULES,
        "identity": standard_identity(servers.jwks),
        "env": {"TEST_API_TOKEN": API_TOKEN},
        **overrides,
    }
    return Gateway(directory, **settings)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, servers) -> Gateway:
    """The standard gateway: mitmdump with the chain, the standard connections and rules."""
    gw = standard_gateway(tmp_path_factory.mktemp("gateway"), servers).start()
    yield gw
    gw.stop()


@pytest.fixture
def token(keys, jwks):
    """Mint a token from the test issuer: token(groups=[...], sub=..., ttl=..., key="rsa")."""

    def mint(key: str = "rsa", **kwargs) -> str:
        return keys[key].token(jwks.issuer, **kwargs)

    return mint


@pytest.fixture
def make(tmp_path, servers):
    """Standard gateways (not started) to configure per test: make(rules=..., runner=...);
    each is stopped when the test ends."""
    started = []

    def make_gateway(**kwargs) -> Gateway:
        gw = standard_gateway(tmp_path / f"gw{len(started)}", servers, **kwargs)
        started.append(gw)
        return gw

    yield make_gateway
    for gw in started:
        gw.stop()
