"""The configuration file: what parses, and errors that name the file and the field."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from addons.engine import config
from addons.engine.connections import Registry

BASE = {
    "connections": [
        {"name": "api", "kind": "http", "hosts": ["api.internal"], "upstream": "http://127.0.0.1:9000",
         "credential": {"type": "bearer", "secret": "env:CFG_TEST_SECRET"}},
    ],
    "rules": "rules",
    "store": {"path": "audit.db"},
    "identity": {"issuers": [{"issuer": "https://idp.example", "audience": "custody", "discovery": True}]},
}


def with_(path: str, value) -> dict:
    doc = copy.deepcopy(BASE)
    target = doc
    keys = path.split(".")
    for k in keys[:-1]:
        target = target[int(k)] if k.isdigit() else target[k]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return doc


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("CFG_TEST_SECRET", "s3cret")


def test_base_parses(tmp_path):
    cfg = config.parse(BASE, str(tmp_path / "custody.yaml"))
    api, gateway = cfg.connections
    assert (gateway.name, gateway.kind, gateway.hosts, gateway.bearer_is_gateway) == (
        "custody", "gateway", ("custody.gateway",), True)
    assert api.credential.header == "authorization" and api.credential.value == "Bearer s3cret"
    assert api.upstream == config.Upstream("http", "127.0.0.1", 9000)
    assert cfg.store.path == str(tmp_path / "audit.db")
    assert cfg.rules == (str(tmp_path / "rules"),)
    assert cfg.identity.issuers[0].algorithms[0] == "RS256"
    assert "HS256" not in cfg.identity.issuers[0].algorithms


@pytest.mark.parametrize(
    "change, value, message",
    [
        ("connections.0.kind", "ftp", "connections[0].kind: 'ftp' is not one of ['http', 'kubernetes', 'postgres', 'ssh', 'mcp', 'llm']"),
        ("connections.0.name", "Bad Name", "connections[0].name: 'Bad Name' does not match"),
        ("connections.0.hosts", [], "connections[0].hosts: [] should be non-empty"),
        ("connections.0.credential.secret", "hunter2", "connections[0].credential.secret: 'hunter2' does not match"),
        ("connections.0.credential.type", "basic", "connections[0].credential: 'username' is a required property"),
        ("connections.0.credential.secret", "env:CFG_TEST_UNSET", "connections[0].credential.secret: environment variable CFG_TEST_UNSET is not set"),
        ("connections.0.credential.secret", "file:missing.txt", "connections[0].credential.secret: [Errno 2] No such file or directory"),
        ("connections.0.tls", {"ca_file": "missing.pem"}, "connections[0].tls.ca_file: no such file"),
        ("connections.0.upstream", "ftp://x", "connections[0].upstream: 'ftp://x' does not match"),
        ("connections.0.paths", "insensitive", "connections[0].paths: 'insensitive' is not one of"),
        ("store", {}, "store.path: required"),
        ("rules", KeyError, "(top level): 'rules' is a required property"),
        ("identity.issuers.0.algorithms", ["HS256"], "identity.issuers[0].algorithms[0]: 'HS256' is not one of"),
        ("identity.issuers.0.discovery", False, "identity.issuers[0]: set jwks_url, or discovery: true"),
        ("identity.issuers.0.leeway", "soon", "identity.issuers[0].leeway: 'soon' does not match"),
        ("identity.dev_issuer", {"enabled": True}, "identity.dev_issuer.key_file: required when enabled"),
        ("identity.colour", "blue", "identity: unknown field ('colour' was unexpected)"),
        ("limits", {"connections": 0}, "limits.connections: 0 is less than the minimum of 1"),
        ("limits", {"authenticate": 0}, "limits.authenticate: must be more than 0"),
        ("limits", {"idle": "0s"}, "limits.idle: must be more than 0"),
        ("limits", {"header_lines": 2}, "limits.header_lines: 2 is less than the minimum of 8"),
        ("limits", {"header_bytes": 100}, "limits.header_bytes: 100 is less than the minimum of 1024"),
        ("limits", {"idle": "soon"}, "limits.idle: 'soon' does not match"),
        ("connections.0.limits", {"header_lines": 10}, "connections[0].limits: unknown field ('header_lines' was unexpected)"),
        ("connections.0.limits", {"idle": "5m"}, "connections[0].limits.idle: only the bridges (postgres, ssh) have their own"),
        ("connections.0.limits", {"authenticate": 0}, "connections[0].limits.authenticate: must be more than 0"),
    ],
)
def test_errors_name_file_and_field(tmp_path, change, value, message):
    with pytest.raises(config.ConfigError) as e:
        config.parse(with_(change, value), str(tmp_path / "custody.yaml"))
    assert str(e.value).startswith(f"{tmp_path}/custody.yaml: ")
    assert message in str(e.value)


def test_a_host_belongs_to_one_connection(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["connections"].append({"name": "b", "kind": "http", "hosts": ["api.internal"]})
    with pytest.raises(config.ConfigError, match="host api.internal is claimed by both api and b"):
        config.parse(doc, str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("setting", ["ca_file", "client_cert"])
def test_one_upstream_one_tls(tmp_path, setting):
    (tmp_path / "tls.pem").write_text("x")
    doc = copy.deepcopy(BASE)
    doc["connections"].append({"name": "b", "kind": "http", "hosts": ["b.internal"], "upstream": "http://127.0.0.1:9000",
                               "tls": {setting: "tls.pem"}})
    with pytest.raises(config.ConfigError, match=f"api and b send to the same upstream 127.0.0.1:9000 with different tls.{setting}"):
        config.parse(doc, str(tmp_path / "c.yaml"))


def test_load_reports_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("connections: [")
    with pytest.raises(config.ConfigError, match=f"{bad}: not valid YAML"):
        config.load(str(bad))


def test_sample_configuration_is_valid(monkeypatch, tmp_path):
    from pathlib import Path

    sample = Path(__file__).parents[1] / "examples" / "custody.yaml"
    doc = yaml.safe_load(sample.read_text())
    (tmp_path / "sample-api.token").write_text("t")
    doc["connections"][0]["credential"]["secret"] = "file:sample-api.token"
    doc["connections"][1]["credential"]["secret"] = "file:sample-api.token"
    doc["connections"][1]["tls"]["ca_file"] = "cluster-ca.pem"
    doc["connections"][2]["credential"]["secret"] = "file:sample-api.token"
    doc["connections"][3]["credential"]["secret"] = "file:sample-api.token"
    doc["connections"][3]["known_hosts"] = "cluster-ca.pem"
    doc["connections"][4]["credential"]["secret"] = "file:sample-api.token"
    doc["connections"][5]["mcp"]["stdio"]["secrets"]["SAMPLE_MCP_SECRET"] = "file:sample-api.token"
    for models in doc["connections"][6:8]:
        models["credential"]["secret"] = "file:sample-api.token"
        models["tls"]["ca_file"] = "cluster-ca.pem"
    (tmp_path / "cluster-ca.pem").write_text("")
    cfg = config.parse(doc, str(tmp_path / "custody.yaml"))
    assert [(c.name, c.kind, c.mcp.stdio is not None) for c in cfg.connections[4:6]] == [
        ("tickets", "mcp", False), ("tickets-local", "mcp", True)]
    assert [(c.name, c.kind, c.llm.api, c.bearer_is_gateway) for c in cfg.connections[6:8]] == [
        ("models", "llm", "openai", True), ("models-anthropic", "llm", "anthropic", True)]
    assert cfg.identity.dev_issuer is not None
    assert [(c.name, c.kind, c.bearer_is_gateway) for c in cfg.connections[:4]] == [
        ("sample-api", "http", False), ("prod-k8s", "kubernetes", True), ("prod-db", "postgres", False),
        ("prod-web", "ssh", False)]
    assert (cfg.connections[3].upstream.port, cfg.connections[3].upstream.database) == (2200, "custody-sample")
    db = cfg.connections[2]
    assert (db.upstream.port, db.upstream.database, db.credential.header, db.listen) == (
        5433, "shop", "app", ("127.0.0.1", 15432))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"upstream": "https://db.internal"}, "connections[0].upstream: a postgres connection needs a postgresql"),
        ({"credential": {"type": "bearer", "secret": "env:HOME"}}, "a postgres connection needs a password credential"),
        ({"upstream": None}, "connections[0].upstream: a postgres connection needs postgresql://host:port/database"),
    ],
)
def test_postgres_connection_errors(tmp_path, change, message):
    conn = {"name": "db", "kind": "postgres", "hosts": ["db.internal"], "upstream": "postgresql://127.0.0.1:5432/shop",
            "credential": {"type": "password", "username": "app", "secret": "env:HOME"}, **change}
    conn = {k: v for k, v in conn.items() if v is not None}
    doc = {"connections": [conn], "rules": "rules", "store": {"path": "a.db"}}
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.parse(doc, str(tmp_path / "c.yaml"))


def test_the_bridge_reads_the_configuration_without_secrets(tmp_path):
    conn = {"name": "db", "kind": "postgres", "hosts": ["db.internal"], "upstream": "postgresql://127.0.0.1:5432/shop",
            "credential": {"type": "password", "username": "app", "secret": "env:CUSTODY_UNSET_SECRET"},
            "listen": "127.0.0.1:15432"}
    doc = {"connections": [conn], "rules": "rules", "store": {"path": "a.db"}}
    with pytest.raises(config.ConfigError, match="CUSTODY_UNSET_SECRET is not set"):
        config.parse(doc, str(tmp_path / "c.yaml"))
    cfg = config.parse(doc, str(tmp_path / "c.yaml"), secrets=False)
    assert cfg.connections[0].credential.value == "" and not (tmp_path / "masking.key").exists()


@pytest.mark.parametrize(
    "value, seconds",
    [(30, 30.0), (1.5, 1.5), ("30s", 30.0), ("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0), ("250ms", 0.25)],
)
def test_durations(value, seconds):
    assert config.parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "-1s", "1w", -1])
def test_bad_durations(value):
    with pytest.raises(ValueError):
        config.parse_duration(value)


@pytest.mark.parametrize(
    "host, port, name",
    [
        ("api.internal", 443, "api"),
        ("API.internal.", 80, "api"),
        ("api.internal", 22, None),
        ("db.internal", 5432, "db"),
        ("db.internal", 443, None),
        ("x.svc.example", 443, "wild"),
        ("a.b.svc.example", 443, "wild"),
        ("svc.example", 443, None),
        ("exact.svc.example", 443, "exact"),
        ("elsewhere", 443, None),
    ],
)
def test_registry(host, port, name):
    c = lambda n, *hosts: config.Connection(n, "http", hosts)  # noqa: E731
    registry = Registry([c("api", "api.internal"), c("db", "db.internal:5432"), c("wild", "*.svc.example"),
                         c("exact", "exact.svc.example")])
    found = registry.find(host, port)
    assert (found.name if found else None) == name


@pytest.mark.parametrize(
    "change, message",
    [
        ({"known_hosts": None}, "an ssh connection needs upstream (ssh://user@host:port), a private_key credential and known_hosts"),
        ({"credential": {"type": "bearer", "secret": "env:HOME"}}, "a private_key credential"),
        ({"known_hosts": "missing_known_hosts"}, "known_hosts: no such file"),
        ({"upstream": "https://web.internal"}, "a ssh connection needs a ssh URL"),
    ],
)
def test_ssh_connection_errors(tmp_path, change, message):
    (tmp_path / "known_hosts").write_text("")
    conn = {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "upstream": "ssh://deploy@10.0.0.5:22",
            "credential": {"type": "private_key", "secret": "env:HOME"}, "known_hosts": "known_hosts", **change}
    conn = {k: v for k, v in conn.items() if v is not None}
    doc = {"connections": [conn], "rules": "rules", "store": {"path": "a.db"}}
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.parse(doc, str(tmp_path / "c.yaml"))


def test_ssh_connection(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    conn = {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "upstream": "ssh://deploy@10.0.0.5:2200",
            "credential": {"type": "private_key", "secret": "env:HOME"}, "known_hosts": "known_hosts",
            "listen": "127.0.0.1:2222"}
    cfg = config.parse({"connections": [conn], "rules": "rules", "store": {"path": "a.db"}}, str(tmp_path / "c.yaml"))
    c = cfg.connections[0]
    assert (c.upstream.host, c.upstream.port, c.upstream.database, c.credential.type) == (
        "10.0.0.5", 2200, "deploy", "private_key")
    assert c.known_hosts == str(tmp_path / "known_hosts") and c.listen == ("127.0.0.1", 2222)


def test_only_http_connections_route_case_insensitively(tmp_path):
    doc = with_("connections.0.paths", "case-insensitive")
    assert config.parse(doc, str(tmp_path / "c.yaml")).connections[0].case_insensitive_paths
    doc["connections"][0]["kind"] = "kubernetes"
    with pytest.raises(config.ConfigError, match=r"connections\[0\].paths: only http connections"):
        config.parse(doc, str(tmp_path / "c.yaml"))


def test_limits_default_and_a_connection_s_own_override_the_top_level(tmp_path):
    assert config.parse(BASE, str(tmp_path / "c.yaml")).limits == config.LimitsConfig(
        connections=1000, authenticate=30.0, idle=600.0, header_lines=100, header_bytes=65536)
    doc = with_("limits", {"connections": 50, "idle": "2m", "header_lines": 40})
    doc["connections"].append({"name": "db", "kind": "postgres", "hosts": ["db.internal"],
                               "upstream": "postgresql://127.0.0.1:5432/shop", "listen": "127.0.0.1:15432",
                               "credential": {"type": "password", "username": "app", "secret": "env:HOME"},
                               "limits": {"connections": 5, "idle": "1h"}})
    cfg = config.parse(doc, str(tmp_path / "c.yaml"))
    api, db = cfg.connections[:2]
    assert cfg.limits == config.LimitsConfig(connections=50, idle=120.0, header_lines=40)
    assert api.limits == cfg.limits
    assert db.limits == config.LimitsConfig(connections=5, authenticate=30.0, idle=3600.0, header_lines=40)


def test_an_ssh_command_ends_before_the_gateway_would_close_its_silent_stream(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    conn = {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "upstream": "ssh://deploy@10.0.0.5:22",
            "credential": {"type": "private_key", "secret": "env:HOME"}, "known_hosts": "known_hosts",
            "command_timeout": "10m"}
    doc = {"connections": [conn], "rules": "rules", "store": {"path": "a.db"}}
    with pytest.raises(config.ConfigError, match=re.escape(
            "connections[0].command_timeout: 600s is not shorter than limits.idle (600s)")):
        config.parse(doc, str(tmp_path / "c.yaml"))
    doc["limits"] = {"idle": "11m"}
    assert config.parse(doc, str(tmp_path / "c.yaml")).connections[0].command_timeout == 600.0


def test_one_listen_address_has_one_set_of_limits(tmp_path):
    (tmp_path / "known_hosts").write_text("")
    web = {"kind": "ssh", "upstream": "ssh://deploy@10.0.0.5:22", "credential": {"type": "private_key", "secret": "env:HOME"},
           "known_hosts": "known_hosts", "listen": "127.0.0.1:2222"}
    doc = {"connections": [{"name": "a", "hosts": ["a.internal"], **web},
                           {"name": "b", "hosts": ["b.internal"], "limits": {"connections": 5}, **web}],
           "rules": "rules", "store": {"path": "a.db"}}
    with pytest.raises(config.ConfigError, match="a and b listen on 127.0.0.1:2222 with different limits"):
        config.parse(doc, str(tmp_path / "c.yaml"))
    doc["connections"][0]["limits"] = {"connections": 5}
    assert config.parse(doc, str(tmp_path / "c.yaml")).connections[1].limits.connections == 5
OIDC = {"issuer": "https://idp.example", "client_id": "custody", "client_secret": "env:CFG_TEST_SECRET"}
SLACK = {"bot_token": "env:CFG_TEST_SECRET", "signing_secret": "file:slack.secret", "channels": ["C0OPS"],
         "users": {"U0ALICE": "Alice@Example.com"}}


def test_approvers_sign_in_and_slack_settings(tmp_path):
    (tmp_path / "slack.secret").write_text("signing\n")
    (tmp_path / "idp.xml").write_text("<EntityDescriptor/>")
    cfg = config.parse(with_("approvals", {"public_url": "https://approvals.example", "session_ttl": "2h", "oidc": OIDC,
                                           "saml": {"idp_metadata": "idp.xml"}, "slack": SLACK}),
                       str(tmp_path / "custody.yaml"))
    a = cfg.approvals
    assert (a.session_ttl, a.oidc.client_id, a.oidc.client_secret, a.oidc.groups_from) == (7200, "custody", "s3cret", "id_token")
    assert a.oidc.issuer is cfg.identity.issuers[0]  # the same trusted issuer: one set of keys, one groups claim
    assert a.saml.entity_id == "https://approvals.example/auth/saml/metadata"
    assert (a.slack.signing_secret, a.slack.users, a.slack.api_url) == ("signing", (("U0ALICE", "alice@example.com"),),
                                                                        "https://slack.com/api/")


@pytest.mark.parametrize("approvals, message", [
    ({"oidc": {**OIDC, "issuer": "https://other.example"}},
     "approvals.oidc: https://other.example must also be in identity.issuers with 'custody' among its audiences"),
    ({"oidc": {**OIDC, "client_id": "approvals-page"}},
     "approvals.oidc: https://idp.example must also be in identity.issuers with 'approvals-page' among its audiences"),
    ({"oidc": {**OIDC, "client_secret": "hunter2"}}, "approvals.oidc.client_secret: 'hunter2' does not match"),
    ({"slack": {**SLACK, "signing_secret": "env:CFG_NO_SUCH_SECRET"}},
     "approvals.slack.signing_secret: environment variable CFG_NO_SUCH_SECRET is not set"),
    ({"slack": {**SLACK, "channels": []}}, "approvals.slack.channels: [] should be non-empty"),
    ({"saml": {"idp_metadata": "missing.xml"}}, "approvals.saml.idp_metadata: no such file"),
])
def test_approvers_settings_errors(tmp_path, approvals, message):
    (tmp_path / "slack.secret").write_text("signing\n")
    with pytest.raises(config.ConfigError) as e:
        config.parse(with_("approvals", approvals), str(tmp_path / "custody.yaml"))
    assert message in str(e.value)


def test_slack_webhooks_gave_way_to_interactive_messages(tmp_path):
    with pytest.raises(config.ConfigError, match=r"notify.webhooks\[0\].format: 'slack' is not one of \['json'\]"):
        config.parse(with_("notify", {"webhooks": [{"url": "https://hooks.example/x", "format": "slack"}]}),
                     str(tmp_path / "custody.yaml"))
