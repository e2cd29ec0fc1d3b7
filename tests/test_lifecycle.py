"""Starting, reloading and running: invalid rules stop a gateway from starting, changed
rules are picked up without a restart (or ignored, keeping the last good set, when invalid),
and the lean runner (`custody run`) governs exactly like mitmdump with the chain."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import STANDARD_RULES

BAD_RULES = {"bad.yaml": {"rules": [{"id": "readers", "match": {"action": "fetch"}, "effect": "allow"}]}}


@pytest.mark.parametrize("runner", ["mitmdump", "custody"])
def test_invalid_rules_stop_the_gateway_from_starting(make, runner):
    gw = make(rules=BAD_RULES, runner=runner)
    code, output = gw.run_to_exit()
    assert code != 0
    assert f"{gw.rules_dir}/bad.yaml: rule 'readers': match.action: 'fetch' is not one of" in output


@pytest.mark.parametrize("runner", ["mitmdump", "custody"])
def test_invalid_configuration_stops_the_gateway_from_starting(make, runner):
    gw = make(runner=runner)
    gw.config["connections"][0]["credential"]["secret"] = "env:NOT_SET_ANYWHERE"
    import yaml

    gw.config_file.write_text(yaml.safe_dump(gw.config))
    code, output = gw.run_to_exit()
    assert code != 0
    assert f"{gw.config_file}: connections[0].credential.secret: environment variable NOT_SET_ANYWHERE is not set" in output


def misspell(config: dict, where: str) -> None:
    """Rename the key at dotted path `where` (the last part) to its misspelling."""
    *parents, key = where.split(".")
    node = config
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key + "z"] = node.pop(key)


RUNNERS = {
    "mitmdump": {},
    "mitmweb": {"runner": "mitmweb", "options": ("web_open_browser=false", "web_port=0")},
    "custody": {"runner": "custody"},
}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize(
    "where, field, says",
    [
        ("rules", "(top level)", "unknown field ('rulesz' was unexpected), did you mean 'rules'?"),
        ("store", "(top level)", "unknown field ('storez' was unexpected), did you mean 'store'?"),
        ("identity.issuers", "identity", "unknown field ('issuersz' was unexpected), did you mean 'issuers'?"),
        ("connections.0.upstream", "connections[0]", "unknown field ('upstreamz' was unexpected), did you mean 'upstream'?"),
        ("connections.0.credential", "connections[0]",
         "unknown field ('credentialz' was unexpected), did you mean 'credential'?"),
        ("identity.jwks_min_interval", "identity",
         "unknown field ('jwks_min_intervalz' was unexpected), did you mean 'jwks_min_interval'?"),
    ],
)
def test_a_misspelled_key_is_one_short_message(make, runner, where, field, says):
    """The file, the field and what is wrong, in a few lines and no traceback, and a
    non-zero exit, whichever way the gateway is started."""
    import yaml

    gw = make(**RUNNERS[runner])
    misspell(gw.config, where)
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    code, output = gw.run_to_exit()
    assert code != 0
    assert f"{gw.config_file}: {field}: {says}" in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 6, output
    assert "Traceback" not in output and "RecursionError" not in output
    assert "overriding mitmproxy options" not in output  # mitmproxy's own defaults are replaced silently


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_rules_reload_when_their_files_change(make, token):
    gw = make().start()
    s = gw.session(token(groups=["analysts"]))
    assert s.get("http://api.test/items").status_code == 200
    gw.write_rules("zz-freeze.yaml", {"rules": [{"id": "freeze", "match": {"connection": "api"}, "effect": "deny", "reason": "frozen"}]})
    assert wait_for(lambda: s.get("http://api.test/items").status_code == 403)
    assert s.get("http://api.test/items").json()["rules"] == ["freeze"]
    assert "rules reloaded: 6 rules from 3 files" in gw.log()
    (gw.rules_dir / "zz-freeze.yaml").unlink()
    assert wait_for(lambda: s.get("http://api.test/items").status_code == 200)


def test_invalid_rule_changes_keep_the_last_good_set(make, token):
    gw = make().start()
    s = gw.session(token(groups=["analysts"]))
    gw.write_rules("access.yaml", "rules:\n  - id: broken\n    match: {action: fetch}\n    effect: allow\n")
    assert wait_for(lambda: "rules changed but are invalid; keeping the last good set" in gw.log())
    assert f"{gw.rules_dir}/access.yaml: rule 'broken': match.action" in gw.log()
    assert s.get("http://api.test/items").status_code == 200  # the old analysts-read still applies
    gw.write_rules("access.yaml", STANDARD_RULES["access.yaml"] | {"rules": STANDARD_RULES["access.yaml"]["rules"][1:]})
    assert wait_for(lambda: s.get("http://api.test/items").status_code == 403)


@pytest.mark.parametrize(
    "groups, url, status",
    [
        (["analysts"], "http://api.test/items", 200),
        (["analysts"], "https://api.test/items", 200),
        (["analysts"], "https://secure.test/items", 200),
        (["analysts"], "http://api.test/admin/x", 403),
        (["nobody"], "http://api.test/items", 403),
        (["analysts"], "http://unknown.test/", 403),
    ],
)
def test_the_lean_runner_governs_like_mitmdump(make, token, upstream, groups, url, status):
    gw = make(runner="custody").start()
    before = len(upstream.received)
    r = gw.session(token(groups=groups)).get(url)
    assert r.status_code == status
    if status != 200:
        assert r.json()["decision"] == "deny" and len(upstream.received) == before
    assert gw.custody("audit", "verify").returncode == 0


def test_the_chain_never_connects_upstream_before_deciding(make, token):
    """Even when told to connect eagerly, the tunnel to a virtual host opens without an
    upstream connection (there is no DNS entry for api.test), because the chain keeps
    mitmproxy's connection strategy lazy."""
    gw = make(options=("connection_strategy=eager",)).start()
    r = gw.session(token(groups=["analysts"])).get("https://api.test/items")
    assert r.status_code == 200


def test_options_that_would_let_bytes_past_the_chain_are_overridden(make, upstream, token):
    """An operator's stream_large_bodies, rawtcp or ignore_hosts cannot open a way around."""
    gw = make(options=("stream_large_bodies=1k", "rawtcp=true", "ignore_hosts=127.0.0.1", "tcp_hosts=.*")).start()
    assert "overriding mitmproxy options the gateway cannot allow" in gw.log()
    seen = len(upstream.received)
    body = b"x" * 4096
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"POST http://api.test/admin/drop HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 407")
    target = f"127.0.0.1:{upstream.port}"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {token(groups=['analysts'])}\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            answer = b""
    assert b"BaseHTTP" not in answer
    assert len(upstream.received) == seen
