"""The `custody` command, run as a real process: tokens, rule checks and explanations, and
reading the audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest
import yaml

from addons.engine import config, devissuer

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    """The sample configuration, its rules and development issuer, in a scratch directory."""
    doc = yaml.safe_load((ROOT / "examples" / "custody.yaml").read_text())
    doc["identity"]["dev_issuer"]["key_file"] = "dev.pem"
    doc["connections"][0]["credential"]["secret"] = "file:api.token"
    cluster = doc["connections"][1]
    cluster["credential"]["secret"], cluster["tls"]["ca_file"] = "file:api.token", "cluster-ca.pem"
    (tmp_path / "cluster-ca.pem").write_text("")
    doc["connections"][2]["credential"]["secret"] = "file:api.token"
    doc["connections"][3]["credential"]["secret"] = "file:api.token"
    doc["connections"][3]["known_hosts"] = "cluster-ca.pem"
    doc["connections"][3]["host_key"] = "bridge-host-key"
    doc["connections"][4]["credential"]["secret"] = "file:api.token"
    doc["connections"][5]["mcp"]["stdio"]["secrets"]["SAMPLE_MCP_SECRET"] = "file:api.token"
    for models in doc["connections"][6:8]:
        models["credential"]["secret"], models["tls"]["ca_file"] = "file:api.token", "cluster-ca.pem"
    doc["rules"] = str(ROOT / "rules")
    doc["store"]["path"] = "audit.db"
    (tmp_path / "api.token").write_text("t")
    cfg = tmp_path / "custody.yaml"
    cfg.write_text(yaml.safe_dump(doc))

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {"CUSTODY_CONFIG": str(cfg), "PATH": str(BIN) + ":/usr/bin:/bin",
               **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}
        return subprocess.run([str(BIN / "custody"), *args], capture_output=True, text=True, env=env, timeout=60)

    run.dir, run.config = tmp_path, cfg
    return run


def test_token_is_signed_by_the_dev_issuer_and_carries_what_was_asked(setup):
    out = setup("token", "--sub", "crew-analyst", "--groups", "analysts,buyers", "--groups", "x",
                "--ttl", "10m", "--model", "gpt-4o", "--agent", "researcher")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    cfg = config.load(str(setup.config))
    jwk = devissuer.public_jwk(devissuer.ensure_key(cfg.identity.dev_issuer.key_file))
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="custody")
    assert claims["sub"] == "crew-analyst" and claims["groups"] == ["analysts", "buyers", "x"]
    assert claims["exp"] - claims["iat"] == 600
    assert (claims["model"], claims["agent"], claims["iss"]) == ("gpt-4o", "researcher", "http://custody.gateway")
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]
    assert oct((setup.dir / "dev.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ttl", "48h"], "custody token: ttl must be between 0 and 86400 seconds"),
        (["--ttl", "soon"], "custody token: not a duration: 'soon'"),
    ],
)
def test_token_errors(setup, args, message):
    out = setup("token", "--sub", "x", *args)
    assert out.returncode == 1 and message in out.stderr


def test_token_needs_the_dev_issuer(setup):
    doc = yaml.safe_load(setup.config.read_text())
    doc["identity"]["dev_issuer"]["enabled"] = False
    setup.config.write_text(yaml.safe_dump(doc))
    out = setup("token", "--sub", "x")
    assert out.returncode == 1
    assert out.stderr.strip() == f"{setup.config}: the development issuer is not enabled (identity.dev_issuer.enabled)"


def test_rules_check(setup, tmp_path):
    ok = setup("rules", "check")
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 34 rules in 6 files")
    bad_dir = tmp_path / "bad-rules"
    bad_dir.mkdir()
    (bad_dir / "x.yaml").write_text(yaml.safe_dump({"rules": [
        {"id": "typo", "match": {"connection": "sample-apii"}, "effect": "allow"},
        {"id": "wrong", "match": {"method": 5}, "effect": "allow"},
    ]}))
    doc = yaml.safe_load(setup.config.read_text())
    doc["rules"] = str(bad_dir)
    setup.config.write_text(yaml.safe_dump(doc))
    out = setup("rules", "check")
    assert out.returncode == 1
    assert f"{bad_dir}/x.yaml: rule 'wrong': match.method: 5 is not of type 'string'" in out.stderr
    (bad_dir / "x.yaml").write_text(yaml.safe_dump({"rules": [{"id": "typo", "match": {"connection": "sample-apii"}, "effect": "allow"}]}))
    warn = setup("rules", "check")
    assert warn.returncode == 0
    assert f"warning: {bad_dir}/x.yaml: rule 'typo': match.connection: no connection named 'sample-apii'" in warn.stdout


@pytest.mark.parametrize(
    "groups, method, url, body, code, effect, rules, matched",
    [
        ("analysts", "GET", "http://sample-api.internal/items", None, 0, "allow",
         ["analysts-read-inventory"], ["analysts-read-inventory"]),
        ("analysts", "DELETE", "https://sample-api.internal/items/1", None, 2, "deny", ["no-deletes"], ["no-deletes"]),
        ("buyers", "POST", "https://sample-api.internal/orders", '{"quantity": 500}', 2, "review",
         ["large-orders-reviewed"], ["buyers-place-orders", "large-orders-reviewed"]),
        ("buyers", "POST", "https://sample-api.internal/orders", '{"quantity": 5}', 0, "allow",
         ["buyers-place-orders"], ["buyers-place-orders"]),
        ("buyers", "GET", "https://sample-api.internal/admin/../admin/keys", None, 2, "deny",
         ["admin-off-limits"], ["admin-off-limits"]),
        ("nobody", "GET", "http://sample-api.internal/items", None, 2, "deny", [], []),
        ("analysts", "GET", "http://elsewhere.example/", None, 2, "deny", [], None),
    ],
)
def test_rules_explain(setup, groups, method, url, body, code, effect, rules, matched):
    token = setup("token", "--sub", "crew", "--groups", groups).stdout.strip()
    args = ["rules", "explain", "--token", token, method, url] + (["--body", body] if body else [])
    out = setup(*args, "--json")
    assert out.returncode == code, out.stderr
    result = json.loads(out.stdout)
    assert result["decision"]["effect"] == effect
    assert result["decision"]["rules"] == rules
    assert ([r["id"] for r in result["matched"]] if "matched" in result else None) == matched
    human = setup(*args).stdout.splitlines()
    assert human[0].startswith(f"decision:  {effect}  (")


def test_rules_explain_with_a_bad_token(setup):
    out = setup("rules", "explain", "--token", "garbage", "GET", "http://sample-api.internal/items")
    assert out.returncode == 2
    assert out.stdout.splitlines()[0] == "decision:  deny  (malformed token)"


def test_audit_commands_on_a_missing_store(setup):
    out = setup("audit", "tail")
    assert out.returncode == 1 and out.stderr.strip() == f"no audit store at {setup.dir}/audit.db"


def test_audit_show_and_tail(setup):
    from addons.engine.model import Decision, Operation
    from addons.engine.store import Event, Store

    store = Store(str(setup.dir / "audit.db"))
    store.append([
        Event(id="ev-1", kind="request", session="sess-1", flow="flow-1", operation=Operation("http", "sample-api", "read", "/items", 10, "GET /items on sample-api")),
        Event(id="ev-2", kind="decision", session="sess-1", flow="flow-1", decision=Decision("deny", ("r",), "no"), status=403),
        Event(id="ev-3", kind="request", session="sess-2", flow="flow-2"),
    ])
    store.close()
    tail = setup("audit", "tail", "-n", "2")
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 2
    assert "decision" in tail.stdout and "deny 403" in tail.stdout
    shown = json.loads(setup("audit", "show", "ev-2", "--json").stdout)
    assert shown["event"]["id"] == "ev-2" and [e["id"] for e in shown["flow"]] == ["ev-1", "ev-2"]
    assert shown["event"]["detail"]["decision"]["reason"] == "no"
    session = json.loads(setup("audit", "show", "sess-1", "--json").stdout)
    assert [e["id"] for e in session] == ["ev-1", "ev-2"]
    missing = setup("audit", "show", "nope")
    assert missing.returncode == 1 and "no event, flow, session or approval 'nope'" in missing.stderr


def test_every_id_one_audit_command_prints_the_next_one_takes(setup):
    """tail prints sequence numbers and sessions, sessions prints session ids: show and
    replay take them as printed."""
    from addons.engine.model import Decision, Operation, Principal
    from addons.engine.store import Event, Store

    who = Principal("crew-analyst", "http://custody.gateway", ("analysts",), {"agent": "researcher"})
    op = Operation("http", "sample-api", "read", "/items", 10, "GET /items on sample-api")
    store = Store(str(setup.dir / "audit.db"))
    store.append([
        Event(id="a1", kind="request", session="sess-a", flow="f1", principal=who, operation=op),
        Event(id="a2", kind="decision", session="sess-a", flow="f1", principal=who, operation=op,
              decision=Decision("allow", ("r",), "ok")),
        Event(id="b1", kind="request", session="sess-b", flow="f2", principal=who, operation=op),
        Event(id="b2", kind="decision", session="sess-b", flow="f2", principal=who, operation=op,
              decision=Decision("deny", ("no",), "no"), status=403),
    ])
    store.close()
    tail = setup("audit", "tail").stdout.splitlines()
    seq = tail[-1].split()[0]
    assert tail[-1].endswith("[session sess-b]")
    shown = json.loads(setup("audit", "show", seq, "--json").stdout)
    assert shown["event"]["id"] == "b2"
    sessions = setup("audit", "sessions")
    assert sessions.returncode == 0, sessions.stderr
    lines = sessions.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["sess-b", "sess-a"]
    assert "crew-analyst" in lines[0] and "1 requests" in lines[0] and "1 denied" in lines[0]
    assert "agent researcher" in lines[0]
    listed = json.loads(setup("audit", "sessions", "--json").stdout)
    assert [(s["session"], s["requests"], s["denied"]) for s in listed] == [("sess-b", 1, 1), ("sess-a", 1, 0)]
    replay = setup("audit", "replay", lines[1].split()[0])
    assert replay.returncode == 0 and replay.stdout.startswith("session sess-a: 2 events")


@pytest.mark.parametrize(
    "files, code, says",
    [
        ({"a.yaml": {"rules": [{"id": "x", "match": {"action": "read"}, "effect": "allow"}]}}, 0, "ok: 1 rules in 1 files"),
        ({"a.yaml": {"rules": [{"id": "x", "match": {"action": "fetch"}, "effect": "allow"}]}}, 1,
         "a.yaml: rule 'x': match.action: 'fetch' is not one of"),
        ({"a.yaml": {"rules": [{"id": "x", "match": {"pathh": "/"}, "effect": "allow"}]}}, 1,
         "a.yaml: rule 'x': match: unknown field ('pathh' was unexpected), did you mean 'path'?"),
        ({"a.yaml": {"rules": [{"id": "x", "match": {}, "effect": "allow"}]},
          "b.yaml": {"rules": [{"id": "x", "match": {}, "effect": "deny"}]}}, 1, "b.yaml: rule 'x': id: already used in"),
        ({"a.yaml": "rules: [\n  - id: x\n"}, 1, "a.yaml: not valid YAML"),
        ({"a.yaml": {"rules": [{"id": "x", "match": {"connection": "nowhere"}, "effect": "allow"}]}}, 0,
         "warning: {dir}/a.yaml: rule 'x': match.connection: no connection named 'nowhere'"),
    ],
)
@pytest.mark.parametrize("as_directory", [True, False])
def test_rules_check_of_candidate_files(setup, tmp_path, files, code, says, as_directory):
    """Candidates are checked as given, without touching (or reading) the live rules."""
    candidates = tmp_path / "candidates"
    candidates.mkdir()
    for name, document in files.items():
        (candidates / name).write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    live = {p: p.read_bytes() for p in (ROOT / "rules").glob("*.yaml")}
    paths = [str(candidates)] if as_directory else [str(candidates / n) for n in sorted(files)]
    out = setup("rules", "check", *paths)
    assert out.returncode == code, out.stdout + out.stderr
    assert says.format(dir=candidates) in out.stdout + out.stderr
    if code == 0:
        assert f"ok: {len(files)} rules in {len(files)} files" in out.stdout and "live" not in out.stdout
    assert {p: p.read_bytes() for p in (ROOT / "rules").glob("*.yaml")} == live


def test_rules_explain_lists_only_the_connections_rules(setup):
    token = setup("token", "--sub", "crew", "--groups", "analysts").stdout.strip()
    out = setup("rules", "explain", "--token", token, "GET", "http://sample-api.internal/items", "--json")
    result = json.loads(out.stdout)
    from addons.engine.rules import RuleSet

    rules = {r.id: r for r in RuleSet.load([str(ROOT / "rules")]).rules}
    listed = [r["id"] for r in result["matched"] + result["not_matched"]]
    assert listed and all(not rules[i].connections or "sample-api" in rules[i].connections for i in listed)
    assert len(listed) < len(rules)
    others = [i for i, r in rules.items() if r.connections and "sample-api" not in r.connections]
    assert others and not set(others) & set(listed)
