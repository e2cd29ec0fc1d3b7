"""The gateway configuration file, parsed once into small typed objects.

One YAML file names the connections, the token issuers, the audit store and where the
rules live (`addons/engine/schemas/config.json` is its schema). Relative paths are relative to
the file. Secrets are references (`env:NAME`, `file:PATH`), resolved here so that a
missing secret stops the gateway at start instead of failing a request later.
"""

from __future__ import annotations

import base64
import fnmatch
import getpass
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from addons.engine import schema

GATEWAY_CONNECTION = "custody"
"""The built-in connection for the gateway's own host (its endpoints and the approvals API)."""


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: float | int | str) -> float:
    """`30` or `"30s"` -> 30.0; `"15m"` -> 900.0; `"250ms"` -> 0.25."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"negative duration: {value}")
        return float(value)
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)", str(value).strip())
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def resolve_secret(ref: str, base: Path) -> str:
    """Read `env:NAME` or `file:PATH` (relative to the config file); never a literal."""
    kind, _, name = ref.partition(":")
    if kind == "env":
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if kind == "file":
        return (base / name).read_text().strip()
    raise ValueError(f"not a secret reference: {ref!r} (use env:NAME or file:PATH)")


@dataclass(frozen=True)
class Credential:
    """What the gateway adds to upstream requests: one header, never seen by the agent.
    For a `password` credential (a database login), `header` holds the user name. For an
    `oauth` credential (a client-credentials grant, RFC 6749 §4.4), `value` is the client
    secret and the header's value is an access token the gateway fetches and refreshes."""

    type: str
    header: str
    value: str = field(repr=False)
    token_url: str = ""
    client_id: str = ""
    scope: str = ""
    audience: str = ""

    @classmethod
    def parse(cls, raw: dict[str, Any], secret: str) -> Credential:
        if raw["type"] == "oauth":
            return cls("oauth", "authorization", secret, token_url=raw["token_url"], client_id=raw["client_id"],
                       scope=raw.get("scope", ""), audience=raw.get("audience", ""))
        if raw["type"] == "bearer":
            return cls("bearer", "authorization", f"Bearer {secret}")
        if raw["type"] == "password":  # a database login: pg_bridge's executor presents it
            return cls("password", raw["username"], secret)
        if raw["type"] == "private_key":  # an SSH key (PEM/OpenSSH text): ssh_bridge's executor uses it
            return cls("private_key", "", secret)
        if raw["type"] == "basic":
            pair = f"{raw['username']}:{secret}".encode()
            return cls("basic", "authorization", "Basic " + base64.b64encode(pair).decode())
        return cls("header", raw["header"].lower(), secret)


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    port: int
    database: str = ""
    """postgres: the database; ssh: the user to log in as (default: the gateway's own user)."""


@dataclass(frozen=True)
class StdioServer:
    """An MCP server the gateway runs itself (`npx …`, `uvx …`), one process per MCP session,
    with an environment only the gateway sees: `env` as given, `secrets` resolved from
    references (and never shown to agents)."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    cwd: str | None = None
    max_sessions: int = 8
    idle: float = 600.0
    timeout: float = 300.0


@dataclass(frozen=True)
class McpSettings:
    """What the gateway knows about an MCP server's tools: the action of each (names or
    globs, exact names first, then globs in the order given), whether the server's own
    annotations may decide it, tool definitions pinned by SHA-256, and whether tools that
    are not pinned here are pinned when first seen (`pin`) or refused (`refuse`)."""

    tools: tuple[tuple[str, str], ...] = ()
    trust_annotations: bool = False
    pins: tuple[tuple[str, str], ...] = ()
    new_tools: str = "pin"
    stdio: StdioServer | None = None
    keepalive: float = 25.0
    """A held call whose client reads event streams is answered within this long with an
    event it resumes from (0: never; the hold then lasts as its rule says, in one request)."""

    def action(self, tool: str) -> str | None:
        """The configured action of a tool, or None when the configuration does not say."""
        for pattern, action in self.tools:
            if pattern == tool:
                return action
        for pattern, action in self.tools:
            if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(tool, pattern):
                return action
        return None


@dataclass(frozen=True)
class LimitsConfig:
    """What one client may cost a listener: open connections, the time from connect to
    authenticated (the first request head on the gateway's listeners, a finished login on
    the bridges), idle time, and the size of a request's header block. Each listener bounds
    its own clients, so a flood on one port leaves the others serving."""

    connections: int = 1000
    authenticate: float = 30.0
    idle: float = 600.0
    header_lines: int = 100
    header_bytes: int = 65536


@dataclass(frozen=True)
class LlmSettings:
    """A model API: the wire format it speaks (`openai`: Chat Completions and Responses;
    `anthropic`: Messages), and how long the tool calls its completions ask for are
    remembered for provenance."""

    api: str
    remember: float = 1800.0


@dataclass(frozen=True)
class Connection:
    """A registered target: traffic to anything else is refused."""

    name: str
    kind: str
    hosts: tuple[str, ...]
    upstream: Upstream | None = None
    ca_file: str | None = None
    credential: Credential | None = None
    bearer_is_gateway: bool = False
    client_cert: str | None = None
    listen: tuple[str, int] | None = None
    server_cert: str | None = None
    max_result_bytes: int = 16 * 1024 * 1024
    known_hosts: str | None = None
    host_key: str | None = None
    max_output_bytes: int = 16 * 1024 * 1024
    command_timeout: float = 300.0
    case_insensitive_paths: bool = False
    """http: the backend routes /ADMIN as /admin, so rules match paths folded to lower case."""
    mcp: McpSettings | None = None
    limits: LimitsConfig = LimitsConfig()
    """Its own listener's (`listen`): the top-level limits, with the connection's own on top."""
    llm: LlmSettings | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values the gateway holds for this connection (never shown to agents)."""
        held = [self.credential.value] if self.credential is not None and self.credential.type != "password" else []
        if self.mcp is not None and self.mcp.stdio is not None:
            held += [v for _, v in self.mcp.stdio.secrets]
        return tuple(v for v in held if v)


@dataclass(frozen=True)
class Issuer:
    """A trusted token issuer. `key_file` is set only for the development issuer."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
    leeway: float = 30.0
    groups_claim: str = "groups"
    agent_claims: dict[str, str] = field(default_factory=dict)
    jwks_url: str | None = None
    discovery: bool = False
    ca_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class DevIssuer:
    key_file: str
    issuer: str
    audience: str
    max_ttl: float


@dataclass(frozen=True)
class IdentityConfig:
    issuers: tuple[Issuer, ...]
    dev_issuer: DevIssuer | None
    max_token_bytes: int = 8192
    jwks_refresh: float = 600.0
    jwks_min_interval: float = 30.0
    jwks_timeout: float = 5.0


@dataclass(frozen=True)
class StoreConfig:
    """The audit store: a SQLite file at `path` (one gateway), or PostgreSQL at `url` (any
    number of replicas). `url` and `password` are kept as written (`env:`/`file:`
    references are resolved when the store is opened, relative to `base`)."""

    path: str
    bodies: str = "full"
    max_body: int = 65536
    synchronous: str = "normal"
    signing_key: str = ""
    verify_key: str = ""
    url: str = ""
    password: str = ""
    pool: int = 4
    timeout: float = 5.0
    base: str = ""
    retention: float = 0.0
    """Events older than this are pruned by the gateway behind a signed checkpoint (0: never)."""
    archive: str = ""
    """Where the gateway writes each pruned prefix first (a directory of signed JSONL bundles)."""
    prune_every: float = 3600.0

    @property
    def signing_key_path(self) -> str:
        """The key that signs checkpoints: `signing_key`, else audit-signing.key beside the store."""
        return self.signing_key or str(self.directory / "audit-signing.key")

    @property
    def directory(self) -> Path:
        """Where the gateway keeps its local files (keys): beside the SQLite file, else
        beside the configuration."""
        return Path(self.path).parent if self.path else Path(self.base)


@dataclass(frozen=True)
class ReplicaConfig:
    """This gateway as one replica of several: how long a stop may take to finish what is
    in flight, how long a stopping replica still accepts connections while load balancers
    notice its failing /readyz, and how long a replica's heartbeat vouches for it (its lease)."""

    grace: float = 10.0
    lease: float = 10.0
    drain_delay: float = 1.0


@dataclass(frozen=True)
class ObservabilityConfig:
    """How the gateway is watched: where it serves its Prometheus metrics (None: nowhere),
    and whether its log lines are text or JSON objects."""

    metrics_listen: tuple[str, int] | None = None
    log_format: str = "text"


@dataclass(frozen=True)
class SinkConfig:
    """Where the audit log is shipped as it is written (addons/sinks.py): `type` is file,
    stdout, syslog (RFC 5424 over TCP, TLS with `tls`), otlp (OTLP/HTTP logs, JSON) or
    webhook; `name` keys its cursor in the store."""

    name: str
    type: str
    path: str = ""
    url: str = ""
    address: tuple[str, int] | None = None
    tls: bool = False
    ca_file: str = ""
    token: str = field(default="", repr=False)
    facility: int = 13
    app_name: str = "custody"
    batch: int = 100
    interval: float = 1.0
    timeout: float = 5.0


@dataclass(frozen=True)
class Webhook:
    url: str
    format: str = "json"
    events: tuple[str, ...] = ("pending", "decided", "expired")


@dataclass(frozen=True)
class OidcSignin:
    """Approvers' page sign-in with an OpenID Connect provider that is also a trusted issuer."""

    issuer: Issuer
    client_id: str
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ("openid", "email", "profile", "groups")
    groups_from: str = "id_token"
    label: str = "Sign in with SSO"


@dataclass(frozen=True)
class SamlSignin:
    """Approvers' page sign-in with a SAML 2.0 identity provider."""

    idp_metadata: str
    entity_id: str
    groups_attribute: str = "groups"
    email_attribute: str = "email"
    label: str = "Sign in with SAML"


@dataclass(frozen=True)
class SlackSettings:
    """Interactive approval messages in Slack, and who a Slack user votes as."""

    bot_token: str = field(repr=False)
    signing_secret: str = field(repr=False)
    channels: tuple[str, ...]
    api_url: str = "https://slack.com/api/"
    team: str = ""
    users: tuple[tuple[str, str], ...] = ()
    signin_max_age: float = 7 * 86400.0


@dataclass(frozen=True)
class ApprovalsConfig:
    """Where approvers act: the gateway host through the proxy, and optionally a listener."""

    listen: tuple[str, int] | None
    public_url: str
    sweep: float = 1.0
    webhooks: tuple[Webhook, ...] = ()
    retries: int = 3
    backoff: float = 1.0
    timeout: float = 5.0
    session_ttl: float = 8 * 3600.0
    oidc: OidcSignin | None = None
    saml: SamlSignin | None = None
    slack: SlackSettings | None = None


@dataclass(frozen=True)
class MaskingConfig:
    workers: int = 1
    timeout: float = 10.0
    max_body: int = 16 * 1024 * 1024
    max_record: int = 1024 * 1024
    hash_key: bytes = field(default=b"", repr=False)
    ner_model: str | None = None


@dataclass(frozen=True)
class Config:
    path: str
    gateway_host: str
    identity: IdentityConfig
    connections: tuple[Connection, ...]
    rules: tuple[str, ...]
    rules_poll: float
    store: StoreConfig
    approvals: ApprovalsConfig
    masking: MaskingConfig
    limits: LimitsConfig = LimitsConfig()
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    sinks: tuple[SinkConfig, ...] = ()
    digest: str = ""
    """SHA-256 of the configuration as parsed, and of the masking key: replicas that differ
    in it do not run the same configuration (`custody status` warns)."""

    def ssh_host_key(self, listen: tuple[str, int]) -> Path:
        """The host key of the ssh_bridge listening at `listen`: the first connection there
        that names one, else `ssh-bridge-host-key` beside the audit store."""
        named = [c.host_key for c in self.connections if c.kind == "ssh" and c.listen == listen and c.host_key]
        return Path(named[0]) if named else self.store.directory / "ssh-bridge-host-key"


DEFAULT_UPSTREAM_PORTS = {"https": 443, "http": 80, "postgresql": 5432, "postgres": 5432, "ssh": 22}
UPSTREAM_SCHEMES = {"http": ("http", "https"), "kubernetes": ("http", "https"), "postgres": ("postgresql", "postgres"),
                    "ssh": ("ssh",), "mcp": ("http", "https"), "llm": ("http", "https")}


def _upstream(url: str, kind: str, where: str) -> Upstream:
    parts = urlsplit(url)
    if parts.scheme not in UPSTREAM_SCHEMES[kind]:
        raise ConfigError(f"{where}.upstream: a {kind} connection needs a {' or '.join(UPSTREAM_SCHEMES[kind])} URL")
    port = parts.port or DEFAULT_UPSTREAM_PORTS[parts.scheme]
    database = {"postgres": parts.path.strip("/"), "ssh": parts.username or getpass.getuser()}.get(kind, "")
    return Upstream(parts.scheme, parts.hostname or "", port, database)


# kubectl sends its kubeconfig token as Authorization: Bearer; that token is the agent's JWT.
# MCP clients send their server's bearer token the same way: through Custody, the agent's JWT.
# So do model SDKs their API key (the gateway holds the provider's).
DEFAULT_TOKEN_HEADER = {"kubernetes": "authorization", "mcp": "authorization", "llm": "authorization"}


BRIDGED = ("postgres", "ssh")
"""Kinds whose `listen` is a bridge's, outside the gateway: they alone have an idle time of their own."""


def _limits(raw: dict[str, Any], inherited: LimitsConfig, where: str) -> LimitsConfig:
    """`inherited` with the values `raw` sets; times must be more than zero."""
    values = {k: parse_duration(v) if k in ("authenticate", "idle") else v for k, v in raw.items()}
    for name in ("authenticate", "idle"):
        if values.get(name) == 0:
            raise ConfigError(f"{where}.{name}: must be more than 0")
    return replace(inherited, **values)


def _connection(raw: dict[str, Any], base: Path, where: str, secrets: bool = True,
                limits: LimitsConfig = LimitsConfig()) -> Connection:
    credential = None
    if "credential" in raw:
        try:
            secret = resolve_secret(raw["credential"]["secret"], base) if secrets else ""
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.credential.secret: {e}") from None
        credential = Credential.parse(raw["credential"], secret)
    tls = raw.get("tls", {})
    ca_file = str(base / tls["ca_file"]) if "ca_file" in tls else None
    if secrets and ca_file and not os.path.isfile(ca_file):
        raise ConfigError(f"{where}.tls.ca_file: no such file: {ca_file}")
    client_cert = str(base / tls["client_cert"]) if "client_cert" in tls else None
    if secrets and client_cert and not os.path.isfile(client_cert):
        raise ConfigError(f"{where}.tls.client_cert: no such file: {client_cert}")
    server_cert = str(base / tls["server_cert"]) if "server_cert" in tls else None
    if server_cert and not os.path.isfile(server_cert):
        raise ConfigError(f"{where}.tls.server_cert: no such file: {server_cert}")
    if raw["kind"] == "postgres":
        if "upstream" not in raw:
            raise ConfigError(f"{where}.upstream: a postgres connection needs postgresql://host:port/database")
        if credential is None or credential.type != "password":
            raise ConfigError(f"{where}.credential: a postgres connection needs a password credential "
                              "(type: password, username, secret)")
    elif raw["kind"] == "ssh":
        if "upstream" not in raw or credential is None or credential.type != "private_key" or "known_hosts" not in raw:
            raise ConfigError(f"{where}: an ssh connection needs upstream (ssh://user@host:port), a private_key "
                              "credential and known_hosts (the host key is pinned, never learned)")
        if secrets and not os.path.isfile(base / raw["known_hosts"]):
            raise ConfigError(f"{where}.known_hosts: no such file: {base / raw['known_hosts']}")
    elif credential is not None and credential.type in ("password", "private_key"):
        raise ConfigError(f"{where}.credential: type {credential.type} is for postgres and ssh connections")
    if raw.get("paths") == "case-insensitive" and raw["kind"] != "http":
        raise ConfigError(f"{where}.paths: only http connections can route case-insensitively")
    if credential is not None and credential.type == "oauth" and raw["kind"] != "mcp":
        raise ConfigError(f"{where}.credential: type oauth is for mcp connections")
    if "idle" in raw.get("limits", {}) and raw["kind"] not in BRIDGED:
        raise ConfigError(f"{where}.limits.idle: only the bridges (postgres, ssh) have their own; the gateway's "
                          "listeners share limits.idle")
    mcp = _mcp(raw, base, where, secrets) if raw["kind"] == "mcp" else None
    if "mcp" in raw and mcp is None:
        raise ConfigError(f"{where}.mcp: only for mcp connections")
    if ("llm" in raw) != (raw["kind"] == "llm"):
        raise ConfigError(f"{where}.llm: only for llm connections" if "llm" in raw else
                          f"{where}: an llm connection needs llm.api (openai or anthropic)")
    if raw["kind"] == "llm" and "upstream" not in raw:
        raise ConfigError(f"{where}.upstream: an llm connection needs the model API's http(s)://host:port")
    return Connection(
        name=raw["name"],
        kind=raw["kind"],
        hosts=tuple(h.lower() for h in raw["hosts"]),
        upstream=_upstream(raw["upstream"], raw["kind"], where) if "upstream" in raw else None,
        ca_file=ca_file,
        credential=credential,
        bearer_is_gateway=raw.get("token_header", DEFAULT_TOKEN_HEADER.get(raw["kind"])) == "authorization",
        client_cert=client_cert,
        listen=listen_address(raw["listen"]) if "listen" in raw else None,
        server_cert=server_cert,
        max_result_bytes=raw.get("max_result_bytes", 16 * 1024 * 1024),
        known_hosts=str(base / raw["known_hosts"]) if "known_hosts" in raw else None,
        host_key=str(base / raw["host_key"]) if "host_key" in raw else None,
        max_output_bytes=raw.get("max_output_bytes", 16 * 1024 * 1024),
        command_timeout=parse_duration(raw.get("command_timeout", "5m")),
        case_insensitive_paths=raw.get("paths") == "case-insensitive",
        mcp=mcp,
        limits=_limits(raw.get("limits", {}), limits, f"{where}.limits"),
        llm=LlmSettings(raw["llm"]["api"], parse_duration(raw["llm"].get("remember", "30m"))) if "llm" in raw else None,
    )


def _mcp(raw: dict[str, Any], base: Path, where: str, secrets: bool) -> McpSettings:
    """An mcp connection reaches its server at `upstream`, or runs it itself (`mcp.stdio`)."""
    settings = raw.get("mcp", {})
    stdio = settings.get("stdio")
    if ("upstream" in raw) == (stdio is not None):
        raise ConfigError(f"{where}: an mcp connection needs either upstream (http(s)://host:port) or mcp.stdio")
    if stdio is not None and "credential" in raw:
        raise ConfigError(f"{where}.credential: a stdio server gets its secrets in its environment (mcp.stdio.secrets)")
    server = None
    if stdio is not None:
        resolved = []
        for name, ref in stdio.get("secrets", {}).items():
            try:
                resolved.append((name, resolve_secret(ref, base) if secrets else ""))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}.mcp.stdio.secrets.{name}: {e}") from None
        server = StdioServer(
            command=tuple(stdio["command"]),
            env=tuple((k, str(v)) for k, v in stdio.get("env", {}).items()),
            secrets=tuple(resolved),
            cwd=str(base / stdio["cwd"]) if "cwd" in stdio else None,
            max_sessions=stdio.get("max_sessions", 8),
            idle=parse_duration(stdio.get("idle", "10m")),
            timeout=parse_duration(stdio.get("timeout", "5m")),
        )
    return McpSettings(
        tools=tuple(settings.get("tools", {}).items()),
        trust_annotations=settings.get("trust_annotations", False),
        pins=tuple((tool, digest.removeprefix("sha256:")) for tool, digest in settings.get("pins", {}).items()),
        new_tools=settings.get("new_tools", "pin"),
        stdio=server,
        keepalive=parse_duration(settings.get("keepalive", "25s")),
    )


def _issuer(raw: dict[str, Any], base: Path) -> Issuer:
    aud = raw["audience"]
    kwargs: dict[str, Any] = {}
    if "algorithms" in raw:
        kwargs["algorithms"] = tuple(raw["algorithms"])
    return Issuer(
        issuer=raw["issuer"],
        audiences=(aud,) if isinstance(aud, str) else tuple(aud),
        leeway=parse_duration(raw.get("leeway", 30)),
        groups_claim=raw.get("groups_claim", "groups"),
        agent_claims=dict(raw.get("agent_claims", {})),
        jwks_url=raw.get("jwks_url"),
        discovery=raw.get("discovery", False),
        ca_file=str(base / raw["ca_file"]) if "ca_file" in raw else None,
        **kwargs,
    )


def _identity(raw: dict[str, Any], base: Path) -> IdentityConfig:
    issuers = [_issuer(i, base) for i in raw.get("issuers", [])]
    for n, i in enumerate(issuers):
        if not (i.jwks_url or i.discovery):
            raise ConfigError(f"identity.issuers[{n}]: set jwks_url, or discovery: true")
    dev = None
    dev_raw = raw.get("dev_issuer", {})
    if dev_raw.get("enabled"):
        if "key_file" not in dev_raw:
            raise ConfigError("identity.dev_issuer.key_file: required when enabled")
        dev = DevIssuer(
            key_file=str((base / dev_raw["key_file"]).resolve()),
            issuer=dev_raw.get("issuer", "http://custody.gateway"),
            audience=dev_raw.get("audience", "custody"),
            max_ttl=parse_duration(dev_raw.get("max_ttl", "24h")),
        )
        issuers.append(
            Issuer(
                issuer=dev.issuer,
                audiences=(dev.audience,),
                algorithms=("ES256",),
                leeway=parse_duration(dev_raw.get("leeway", 30)),
                agent_claims={k: k for k in ("agent", "model", "run", "task", "prompt")},
                key_file=dev.key_file,
            )
        )
    names = [i.issuer for i in issuers]
    if len(set(names)) != len(names):
        raise ConfigError("identity.issuers: the same issuer is listed twice")
    return IdentityConfig(
        issuers=tuple(issuers),
        dev_issuer=dev,
        max_token_bytes=raw.get("max_token_bytes", 8192),
        jwks_refresh=parse_duration(raw.get("jwks_refresh", "10m")),
        jwks_min_interval=parse_duration(raw.get("jwks_min_interval", "30s")),
        jwks_timeout=parse_duration(raw.get("jwks_timeout", "5s")),
    )


def listen_address(spec: str) -> tuple[str, int]:
    """"127.0.0.1:9090" or "9090" (loopback) -> (host, port)."""
    host, _, port = spec.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _observability(metrics: dict[str, Any], log: dict[str, Any]) -> ObservabilityConfig:
    return ObservabilityConfig(metrics_listen=listen_address(metrics["listen"]) if "listen" in metrics else None,
                               log_format=log.get("format", "text"))


def _sinks(raw: list[dict[str, Any]], base: Path, path: str, secrets: bool) -> tuple[SinkConfig, ...]:
    names = [s.get("name", s["type"]) for s in raw]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: sinks: two sinks named alike (name one of them: it keys its cursor)")
    out = []
    for name, s in zip(names, raw):
        token = _secret(s["token"], base, f"sinks.{name}.token", secrets) if "token" in s else ""
        tls = s.get("tls")
        out.append(SinkConfig(
            name=name, type=s["type"], path=str((base / s["path"]).resolve()) if "path" in s else "",
            url=s.get("url", ""), address=_address(s["address"]) if "address" in s else None,
            tls=tls is not None and tls is not False, ca_file=str((base / tls["ca_file"]).resolve())
            if isinstance(tls, dict) and "ca_file" in tls else "",
            token=token, facility=s.get("facility", 13), app_name=s.get("app_name", "custody"),
            batch=s.get("batch", 100), interval=parse_duration(s.get("interval", "1s")),
            timeout=parse_duration(s.get("timeout", "5s"))))
    return tuple(out)


def _address(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]"), int(port)


def _secret(ref: str, base: Path, where: str, secrets: bool) -> str:
    if not secrets:
        return ""
    try:
        return resolve_secret(ref, base)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _oidc(raw: dict[str, Any], identity: IdentityConfig, base: Path, secrets: bool) -> OidcSignin:
    """The page's OIDC sign-in; its issuer is one the gateway trusts, for the same client id."""
    issuer = next((i for i in identity.issuers if i.issuer == raw["issuer"]), None)
    if issuer is None or raw["client_id"] not in issuer.audiences:
        raise ConfigError(f"approvals.oidc: {raw['issuer']} must also be in identity.issuers with "
                          f"{raw['client_id']!r} among its audiences (its ID tokens are verified as tokens)")
    return OidcSignin(
        issuer=issuer,
        client_id=raw["client_id"],
        client_secret=_secret(raw["client_secret"], base, "approvals.oidc.client_secret", secrets)
        if "client_secret" in raw else "",
        scopes=tuple(raw.get("scopes", ("openid", "email", "profile", "groups"))),
        groups_from=raw.get("groups_from", "id_token"),
        label=raw.get("label", "Sign in with SSO"),
    )


def _saml(raw: dict[str, Any], public_url: str, base: Path, secrets: bool) -> SamlSignin:
    metadata = str((base / raw["idp_metadata"]).resolve())
    if secrets and not os.path.isfile(metadata):
        raise ConfigError(f"approvals.saml.idp_metadata: no such file: {metadata}")
    return SamlSignin(
        idp_metadata=metadata,
        entity_id=raw.get("entity_id", f"{public_url}/auth/saml/metadata"),
        groups_attribute=raw.get("groups_attribute", "groups"),
        email_attribute=raw.get("email_attribute", "email"),
        label=raw.get("label", "Sign in with SAML"),
    )


def _slack(raw: dict[str, Any], base: Path, secrets: bool) -> SlackSettings:
    return SlackSettings(
        bot_token=_secret(raw["bot_token"], base, "approvals.slack.bot_token", secrets),
        signing_secret=_secret(raw["signing_secret"], base, "approvals.slack.signing_secret", secrets),
        channels=tuple(raw["channels"]),
        api_url=raw.get("api_url", "https://slack.com/api/").rstrip("/") + "/",
        team=raw.get("team", ""),
        users=tuple((user, email.lower()) for user, email in raw.get("users", {}).items()),
        signin_max_age=parse_duration(raw.get("signin_max_age", "7d")),
    )


def _approvals(raw: dict[str, Any], notify: dict[str, Any], gateway_host: str, identity: IdentityConfig,
               base: Path, secrets: bool) -> ApprovalsConfig:
    listen = listen_address(raw["listen"]) if "listen" in raw else None
    public = raw.get("public_url") or (f"http://{listen[0]}:{listen[1]}" if listen else f"http://{gateway_host}")
    public = public.rstrip("/")
    return ApprovalsConfig(
        listen=listen,
        public_url=public,
        sweep=parse_duration(raw.get("sweep", "1s")),
        webhooks=tuple(
            Webhook(w["url"], w.get("format", "json"), tuple(w.get("events", ("pending", "decided", "expired"))))
            for w in notify.get("webhooks", [])
        ),
        retries=notify.get("retries", 3),
        backoff=parse_duration(notify.get("backoff", "1s")),
        timeout=parse_duration(notify.get("timeout", "5s")),
        session_ttl=parse_duration(raw.get("session_ttl", "8h")),
        oidc=_oidc(raw["oidc"], identity, base, secrets) if "oidc" in raw else None,
        saml=_saml(raw["saml"], public, base, secrets) if "saml" in raw else None,
        slack=_slack(raw["slack"], base, secrets) if "slack" in raw else None,
    )


def _masking(raw: dict[str, Any], base: Path, store_dir: Path, path: str) -> MaskingConfig:
    """Masking settings; without a configured hash key, a key file beside the audit store."""
    if "hash_key" in raw:
        try:
            key = resolve_secret(raw["hash_key"], base).encode()
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: masking.hash_key: {e}") from None
    else:
        key_file = store_dir / "masking.key"
        if not key_file.exists():
            store_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(base64.b64encode(os.urandom(32)).decode())
        key = key_file.read_text().strip().encode()
    return MaskingConfig(
        workers=raw.get("workers", 1),
        timeout=parse_duration(raw.get("timeout", "10s")),
        max_body=raw.get("max_body", 16 * 1024 * 1024),
        max_record=raw.get("max_record", 1024 * 1024),
        hash_key=key,
        ner_model=raw.get("ner_model"),
    )


def parse(raw: Any, path: str, secrets: bool = True) -> Config:
    """Validate and build a Config from the parsed YAML of the file at `path`. Without
    `secrets`, connection credentials are left empty and the files only the gateway reads
    (upstream CAs and client certificates, known_hosts) are not required: for processes
    such as pg_bridge and the command line that must never hold them."""
    problems = schema.errors("config", raw)
    if problems:
        raise ConfigError(
            "\n".join(f"{path}: {where}: {message}" for where, message in problems)
        )
    base = Path(path).resolve().parent
    try:
        limits = _limits(raw.get("limits", {}), LimitsConfig(), "limits")
        connections = tuple(
            _connection(c, base, f"connections[{n}]", secrets, limits) for n, c in enumerate(raw["connections"])
        )
        identity = _identity(raw.get("identity", {}), base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    gateway_host = raw.get("gateway", {}).get("host", "custody.gateway").lower()
    if any(c.name == GATEWAY_CONNECTION for c in connections):
        raise ConfigError(f"{path}: connections: the name {GATEWAY_CONNECTION!r} is reserved for the gateway itself")
    connections += (Connection(GATEWAY_CONNECTION, "gateway", (gateway_host,), bearer_is_gateway=True),)
    seen: dict[str, str] = {}
    for c in connections:
        for h in c.hosts:
            if h in seen:
                raise ConfigError(f"{path}: connections: host {h} is claimed by both {seen[h]} and {c.name}")
            seen[h] = c.name
    names = [c.name for c in connections]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: connections: duplicate connection name")
    for n, c in enumerate(connections):
        if c.kind == "ssh" and c.command_timeout >= limits.idle:  # a silent command's stream would close first
            raise ConfigError(f"{path}: connections[{n}].command_timeout: {c.command_timeout:g}s is not shorter than "
                              f"limits.idle ({limits.idle:g}s), after which the gateway closes a stream without output")
    if clash := _disagreeing(connections, lambda c: c.listen, ("limits",)):  # one listener, one set of limits
        other, c, _ = clash  # (ssh connections share an address)
        raise ConfigError(f"{path}: connections: {other.name} and {c.name} listen on "
                          f"{c.listen[0]}:{c.listen[1]} with different limits")
    if clash := _disagreeing(connections, _upstream_address, ("ca_file", "client_cert")):  # TLS is chosen by address
        other, c, setting = clash
        raise ConfigError(f"{path}: connections: {other.name} and {c.name} send to the same upstream "
                          f"{c.upstream.host}:{c.upstream.port} with different tls.{setting}")
    rules = raw["rules"]
    store = _store(raw["store"], base, path)
    masking = _masking(raw.get("masking", {}), base, store.directory, path) if secrets else MaskingConfig()
    gateway = raw.get("gateway", {})
    try:
        approvals = _approvals(raw.get("approvals", {}), raw.get("notify", {}), gateway_host, identity, base, secrets)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return Config(
        path=str(Path(path).resolve()),
        gateway_host=gateway_host,
        identity=identity,
        connections=connections,
        rules=tuple(str((base / r).resolve()) for r in ([rules] if isinstance(rules, str) else rules)),
        rules_poll=parse_duration(raw.get("rules_poll", "1s")),
        store=store,
        approvals=approvals,
        masking=masking,
        limits=limits,
        replica=ReplicaConfig(grace=parse_duration(gateway.get("grace", "10s")),
                              lease=parse_duration(gateway.get("lease", "10s")),
                              drain_delay=parse_duration(gateway.get("drain_delay", "1s"))),
        observability=_observability(raw.get("metrics", {}), raw.get("log", {})),
        sinks=_sinks(raw.get("sinks", []), base, path, secrets),
        digest=hashlib.sha256((canonical(raw) + hashlib.sha256(masking.hash_key).hexdigest()).encode()).hexdigest(),
    )


def _disagreeing(connections: tuple[Connection, ...], key: Callable[[Connection], Any],
                 settings: tuple[str, ...]) -> tuple[Connection, Connection, str] | None:
    """The first two connections with the same `key` (None: none) that differ in one of
    `settings`, and that setting: what one address must have once only."""
    first: dict[Any, Connection] = {}
    for c in connections:
        if (k := key(c)) is None:
            continue
        other = first.setdefault(k, c)
        for setting in settings:
            if getattr(other, setting) != getattr(c, setting):
                return other, c, setting
    return None


def _upstream_address(c: Connection) -> tuple[str, int] | None:
    return (c.upstream.host, c.upstream.port) if c.upstream is not None else None


def canonical(raw: Any) -> str:
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _store(raw: dict[str, Any], base: Path, path: str) -> StoreConfig:
    """`path` (SQLite) or `url` (PostgreSQL), exactly one; a password only as a reference."""
    if "path" not in raw and "url" not in raw:
        raise ConfigError(f"{path}: store.path: required (a SQLite file, for one gateway), "
                          "or store.url (PostgreSQL, for several replicas)")
    if "path" in raw and "url" in raw:
        raise ConfigError(f"{path}: store: path (SQLite) and url (PostgreSQL) exclude each other")
    url = raw.get("url", "")
    if url and not url.startswith(("env:", "file:")):
        if urlsplit(url).scheme not in ("postgresql", "postgres"):
            raise ConfigError(f"{path}: store.url: a postgresql:// URL, or env:NAME / file:PATH holding one")
        if urlsplit(url).password is not None:
            raise ConfigError(f"{path}: store.url: no password in the file; use store.password: env:NAME or file:PATH")
    return StoreConfig(
        path=str((base / raw["path"]).resolve()) if "path" in raw else "",
        bodies=raw.get("bodies", "full"),
        max_body=raw.get("max_body", 65536),
        synchronous=raw.get("synchronous", "normal"),
        signing_key=str((base / raw["signing_key"]).resolve()) if "signing_key" in raw else "",
        verify_key=str((base / raw["verify_key"]).resolve()) if "verify_key" in raw else "",
        url=url,
        password=raw.get("password", ""),
        pool=raw.get("pool", 4),
        timeout=parse_duration(raw.get("timeout", "5s")),
        base=str(base),
        retention=parse_duration(raw["retention"]) if "retention" in raw else 0.0,
        archive=str((base / raw["archive"]).resolve()) if "archive" in raw else "",
        prune_every=parse_duration(raw.get("prune_every", "1h")),
    )


def load(path: str, secrets: bool = True) -> Config:
    """Read, validate and parse the configuration file at `path`."""
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse(raw, path, secrets)


def find(explicit: str | None = None) -> str:
    """The configuration path: an explicit one, else $CUSTODY_CONFIG, else ./custody.yaml."""
    path = os.path.abspath(explicit or os.environ.get("CUSTODY_CONFIG") or "custody.yaml")
    if not os.path.isfile(path):
        raise ConfigError(
            f"no configuration file at {path}: pass --config or set CUSTODY_CONFIG "
            "(scripts/run uses examples/custody.yaml)"
        )
    return path
