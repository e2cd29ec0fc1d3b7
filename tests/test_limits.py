"""What one client may cost each listener (addons/limits.py, pg_bridge, ssh_bridge): the
proxy (plain and CONNECT), the approvals listener, a connection's direct listener, and the
two bridges. Oversized headers are refused with 431 before anything reads them; clients
that do not authenticate in time, or sit idle, are disconnected; past the connection limit
the next client is refused; and a fuzz of malformed protocol messages on every port leaves
every listener serving real clients, with nothing reaching a backend.

Three gateways: `quick` has short times (a second to authenticate, a few to idle),
`crowded` few connections per listener and long times, so the tests of one never race the
other's clock, and `roomy` the defaults, for the flood. Nothing here asserts a time: a client's own timeout is the only bound.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import http.client
import json
import random
import re
import socket
import ssl
import subprocess
import threading
import time

import psycopg
import pytest
import requests
import yaml

from addons.engine.errors import GATEWAY_FAILURES
from addons.limits import HoldAwareWatchdog
from tests.conftest import API_TOKEN, STANDARD_RULES, standard_gateway
from tests.support import fuzz
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.pgbridge import BridgeProcess, psql
from tests.support.servers import free_port
from tests.test_postgres import APP_PASSWORD, pg  # noqa: F401  (the real PostgreSQL, with its tables)
from tests.test_ssh import askpass, client_env, ssh, ssh_options, sshd  # noqa: F401  (the real sshd)

QUICK = {"authenticate": "1s", "idle": "5s"}
QUICK_BRIDGES = {"idle": "1500ms"}  # pg_bridge's and ssh_bridge's own: shorter than the gateway's
CROWDED = {"connections": 6, "authenticate": "60s", "idle": "60s"}
CROWDED_DIRECT = {"connections": 3}  # the direct listener's own limit
LIMITS_RULES = {"rules": [
    {"id": "direct-reads", "match": {"connection": "direct-api", "principal": {"groups": ["analysts"]},
                                     "action": "read"}, "effect": "allow"},
    {"id": "held-writes", "match": {"connection": "api", "method": "POST", "path": "/held"}, "effect": "review",
     "review": {"approvers": ["group:managers"], "timeout": "60s"}},
]}


def limited_gateway(directory, servers, pg, sshd, top: dict, bridges: dict, direct: dict) -> Gateway:  # noqa: F811
    """The standard gateway with an approvals listener, a direct listener (an http
    connection: the same reverse-mode listener kubernetes and mcp connections get), a
    postgres and an ssh connection, with these limits."""
    gw = standard_gateway(directory, servers, env={"TEST_API_TOKEN": API_TOKEN, "PG_APP_PASSWORD": APP_PASSWORD},
                          rules={**STANDARD_RULES, "limits.yaml": LIMITS_RULES,
                                 "postgres.yaml": (ROOT / "rules" / "postgres.yaml").read_text(),
                                 "ssh.yaml": (ROOT / "rules" / "ssh.yaml").read_text()})
    gw.direct_port, gw.pg_port, gw.bridge_port, approvals = free_port(), free_port(), free_port(), free_port()
    gw.config["connections"] += [
        {"name": "direct-api", "kind": "http", "hosts": ["direct.test"], "token_header": "authorization",
         "upstream": f"http://127.0.0.1:{servers.upstream.port}", "listen": f"127.0.0.1:{gw.direct_port}",
         **({"limits": direct} if direct else {})},
        {"name": "prod-db", "kind": "postgres", "hosts": ["db.prod.internal"],
         "upstream": f"postgresql://127.0.0.1:{pg.port}/shop", "listen": f"127.0.0.1:{gw.pg_port}",
         "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"}, "limits": bridges},
        {"name": "prod-web", "kind": "ssh", "hosts": ["web.prod.internal"],
         "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "known_hosts": str(sshd.known_hosts),
         "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"},
         "listen": f"127.0.0.1:{gw.bridge_port}", "host_key": str(directory / "bridge_host_key"),
         "command_timeout": "4500ms", "limits": bridges},  # shorter than the gateway's idle time (quick: 5s)
    ]
    gw.config["limits"] = top
    gw.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.approvals_port, gw.approvals_url = approvals, f"http://127.0.0.1:{approvals}"
    gw.start()
    wait_for(lambda: listening(gw.approvals_url) and listening(f"https://127.0.0.1:{gw.direct_port}"))
    wait_for(lambda: requests.get(f"{gw.approvals_url}/readyz", timeout=5).status_code == 200, timeout=120)
    # ready: the masking workers started (a bridge's login step waits for them, and quick's
    # bridges allow a second to log in)
    gw.pg = BridgeProcess(gw, gw.pg_port, directory / "pg_bridge.log")
    gw.ssh = BridgeProcess(gw, gw.bridge_port, directory / "ssh_bridge.log", module="ssh_bridge")
    return gw


@pytest.fixture(scope="module")
def quick(tmp_path_factory, servers, pg, sshd):  # noqa: F811
    gw = limited_gateway(tmp_path_factory.mktemp("quick"), servers, pg, sshd, QUICK, QUICK_BRIDGES, {})
    yield gw
    gw.pg.stop(), gw.ssh.stop(), gw.stop()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, servers, pg, sshd):  # noqa: F811
    gw = limited_gateway(tmp_path_factory.mktemp("roomy"), servers, pg, sshd, {}, {}, {})  # the defaults
    yield gw
    gw.pg.stop(), gw.ssh.stop(), gw.stop()


@pytest.fixture(scope="module")
def crowded(tmp_path_factory, servers, pg, sshd):  # noqa: F811
    gw = limited_gateway(tmp_path_factory.mktemp("crowded"), servers, pg, sshd, CROWDED, {}, CROWDED_DIRECT)
    yield gw
    gw.pg.stop(), gw.ssh.stop(), gw.stop()


@pytest.fixture(scope="module")
def tokens(keys, jwks):
    def mint(sub: str, groups: list[str]) -> str:
        return keys["rsa"].token(jwks.issuer, sub=sub, groups=groups, ttl=3600)

    return {"analyst": mint("crew-analyst", ["analysts"]), "writer": mint("crew-writer", ["writers", "app-writers"]),
            "manager": mint("mgr-1", ["managers"]), "dba": mint("dba-1", ["dba"]), "ops": mint("crew-ops", ["ops"]),
            "sre": mint("sre-1", ["sre"]), "stranger": mint("nobody", [])}


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"agent:{token}".encode()).decode()


# real clients, to show a listener still serves


def proxy_read(gw: Gateway, token: str) -> int:
    """requests through the proxy: the status, or 0 when the connection was refused."""
    try:
        with gw.session(token) as session:  # closed: a kept-alive connection would count against the limit
            return session.get("http://api.test/items", timeout=30).status_code
    except requests.ConnectionError:
        return 0


def approvals_read(gw: Gateway, token: str) -> int:
    try:
        return requests.get(f"{gw.approvals_url}/approvals", headers={"Authorization": f"Bearer {token}"},
                            timeout=30).status_code
    except requests.ConnectionError:
        return 0


def direct_read(gw: Gateway, token: str) -> int:
    """curl to the direct listener, the connection's host name resolved to it."""
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30",
                           "--cacert", str(gw.ca), "--resolve", f"direct.test:{gw.direct_port}:127.0.0.1",
                           "-H", f"Authorization: Bearer {token}", f"https://direct.test:{gw.direct_port}/items"],
                          capture_output=True, text=True, timeout=40)
    return int(done.stdout or 0)


def pg_read(gw: Gateway, token: str) -> int:
    done = psql(gw.pg_port, token, "-A", "-t", "-c", "SELECT count(*) > 0 FROM users")
    return 200 if (done.returncode, done.stdout.strip()) == (0, "t") else done.returncode


def ssh_read(gw: Gateway, askpass, token: str) -> int:  # noqa: F811
    done = ssh(gw, askpass, token, "echo served")
    return 200 if (done.returncode, done.stdout) == (0, b"served\n") else done.returncode


def serving(gw: Gateway, tokens: dict, askpass) -> dict[str, int]:  # noqa: F811
    """Every listener, through a real client: 200 where it served."""
    return {"proxy": proxy_read(gw, tokens["analyst"]), "approvals": approvals_read(gw, tokens["manager"]),
            "direct": direct_read(gw, tokens["analyst"]), "pg_bridge": pg_read(gw, tokens["writer"]),
            "ssh_bridge": ssh_read(gw, askpass, tokens["ops"])}


EVERY_LISTENER_SERVES = {"proxy": 200, "approvals": 200, "direct": 200, "pg_bridge": 200, "ssh_bridge": 200}


# raw clients, for what real clients never send


def tls(sock: socket.socket, gw: Gateway, host: str) -> ssl.SSLSocket:
    return ssl.create_default_context(cafile=str(gw.ca)).wrap_socket(sock, server_hostname=host)


def answer(sock: socket.socket, data: bytes) -> tuple[int, dict]:
    """Send one request; the status and JSON body of the answer."""
    sock.sendall(data)
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, json.loads(body) if body.startswith(b"{") else {"raw": body.decode(errors="replace")}


def head(line: str, fields: list[tuple[str, str]]) -> bytes:
    return (line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n").encode()


PADDING = {
    "too many lines": [(f"x-pad-{i}", "v") for i in range(120)],
    "too many bytes": [(f"x-pad-{i}", "v" * 8000) for i in range(9)],
    "20,000 X-Custody lines": [(f"x-custody-pad-{i}", "v") for i in range(20000)],
}


def oversized(gw: Gateway, tokens: dict, listener: str, padding: list[tuple[str, str]]) -> tuple[int, dict]:
    """A request (a valid agent's, but for its headers) to `listener`, padded with `padding`."""
    token = tokens["analyst"]
    if listener == "proxy":
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
            return answer(s, head("GET http://api.test/items HTTP/1.1",
                                  [("Host", "api.test"), ("Proxy-Authorization", basic(token)), *padding]))
    if listener == "CONNECT":
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
            return answer(s, head("CONNECT secure.test:443 HTTP/1.1",
                                  [("Host", "secure.test:443"), ("Proxy-Authorization", basic(token)), *padding]))
    if listener == "in a tunnel":
        with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
            s.sendall(head("CONNECT secure.test:443 HTTP/1.1",
                           [("Host", "secure.test:443"), ("Proxy-Authorization", basic(token))]))
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            with tls(s, gw, "secure.test") as t:
                return answer(t, head("GET /items HTTP/1.1", [("Host", "secure.test"), *padding]))
    if listener == "approvals":
        with socket.create_connection(("127.0.0.1", gw.approvals_port), timeout=30) as s:
            return answer(s, head("GET /approvals HTTP/1.1", [("Host", f"127.0.0.1:{gw.approvals_port}"),
                                                              ("Authorization", f"Bearer {tokens['manager']}"),
                                                              *padding]))
    assert listener == "direct"
    with socket.create_connection(("127.0.0.1", gw.direct_port), timeout=30) as s, tls(s, gw, "direct.test") as t:
        return answer(t, head("GET /items HTTP/1.1",
                              [("Host", "direct.test"), ("Authorization", f"Bearer {token}"), *padding]))


def received(servers) -> int:
    return len(servers.upstream.received) + len(servers.tls_upstream.received)


def recorded_refusal(gw: Gateway, body: dict) -> dict:
    """The refusal's decision event, and the request it refused as recorded (if any)."""
    event = gw.event(body["event_id"])
    requests = gw.events("flow = ? AND kind = 'request'", [event["flow"]])
    return {"status": event["status"], "effect": event["effect"],
            "error": json.loads(event["detail"])["decision"]["error"],
            "recorded header lines": [len(json.loads(r["detail"])["headers"]) <= 100 for r in requests]}


# headers


@pytest.mark.parametrize("padding", PADDING)
@pytest.mark.parametrize("listener", ["proxy", "CONNECT", "in a tunnel", "approvals", "direct"])
def test_oversized_headers_are_refused_before_anything_reads_them(quick, servers, tokens, listener, padding):
    before = received(servers)
    status, body = oversized(quick, tokens, listener, PADDING[padding])
    assert (status, body.get("error"), body.get("decision")) == (431, "headers_too_large", "deny"), body
    assert re.fullmatch(r"\d+ (header lines, more than the 100|bytes of header fields, more than the 65536) "
                        r"allowed; nothing was forwarded", body["reason"])
    assert received(servers) == before
    expected = {"status": 431, "effect": "deny", "error": "headers_too_large",
                "recorded header lines": [] if listener == "CONNECT" else [True]}
    assert recorded_refusal(quick, body) == expected


def http2_get(gw: Gateway, token: str, padding: list[tuple[str, str]]) -> tuple[str, int, dict]:
    """curl over HTTP/2 to the direct listener: the HTTP version, the status (0 when the
    stream failed) and the JSON body."""
    done = subprocess.run(["curl", "-sS", "--http2", "--max-time", "30", "--cacert", str(gw.ca), "-w",
                           "\n%{http_version} %{http_code}", "--resolve", f"direct.test:{gw.direct_port}:127.0.0.1",
                           "-H", f"Authorization: Bearer {token}", *(a for k, v in padding for a in ("-H", f"{k}: {v}")),
                           f"https://direct.test:{gw.direct_port}/items"], capture_output=True, text=True, timeout=40)
    body, _, status = done.stdout.rpartition("\n")
    version, code = status.split()
    return version, int(code), json.loads(body) if body.startswith("{") else {"stderr": done.stderr}


def test_http2_requests_have_the_same_header_bounds(quick, servers, tokens):
    before = received(servers)
    version, status, body = http2_get(quick, tokens["analyst"], PADDING["too many lines"])
    assert (version, status, body.get("error")) == ("2", 431, "headers_too_large"), body
    assert recorded_refusal(quick, body)["error"] == "headers_too_large"
    # a header list larger than the h2 library's own bound (64 KiB, what it advertises in its
    # SETTINGS) ends the connection before any hook sees it: curl's "connection died" (56)
    version, status, body = http2_get(quick, tokens["analyst"], PADDING["too many bytes"])
    assert (version, status) == ("0", 0) and body["stderr"].startswith("curl: (56) "), body
    assert received(servers) == before
    assert http2_get(quick, tokens["analyst"], [])[:2] == ("2", 200)
    assert received(servers) == before + 1


def test_a_flood_of_oversized_requests_does_not_hold_up_real_clients(roomy, servers, tokens):
    """On `roomy`: on `quick` a busy machine may take longer than its second to authenticate
    to read a head of 20,000 lines (the client is then disconnected, not refused), on
    `crowded` the attackers' closing connections may still count against its six."""
    flood = head("GET http://api.test/items HTTP/1.1", [("Host", "api.test"), *PADDING["20,000 X-Custody lines"]])
    answers: list[int] = []

    def attacker():
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", roomy.port), timeout=60) as s:
                answers.append(answer(s, flood)[0])

    attackers = [threading.Thread(target=attacker) for _ in range(4)]
    for a in attackers:
        a.start()
    before, served = received(servers), []
    while any(a.is_alive() for a in attackers) or not served:
        served.append(proxy_read(roomy, tokens["analyst"]))  # requests' own timeout is the only bound
    for a in attackers:
        a.join()
    assert answers == [431] * 20
    assert set(served) == {200} and received(servers) == before + len(served)


# time to authenticate, and idle time


def hold_open(port: int, count: int, first: bytes = b"") -> list[socket.socket]:
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    for s in socks:
        if first:
            s.sendall(first)
    return socks


def until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout
    bounds the wait: a connection left open fails the test)."""
    data = b""
    with s:
        while chunk := s.recv(65536):
            data += chunk
    return data


PARTIAL = {
    "proxy": b"GET http://api.test/items HTTP/1.1\r\nHost: api.test\r\n",  # a head that never ends
    "approvals": b"GET /approvals HTTP/1.1\r\n",
    "direct": b"\x16\x03\x01\x00\xc8\x01",  # a TLS ClientHello that never ends
    "pg_bridge": b"\x00\x00\x00\x64\x00\x03\x00\x00user\x00",  # a startup packet short of its length
    "ssh_bridge": b"SSH-2.0-OpenSSH_9.2p1\r\n",  # a banner, and then nothing
}


def listener_port(gw: Gateway, listener: str) -> int:
    return {"proxy": gw.port, "approvals": gw.approvals_port, "direct": gw.direct_port, "pg_bridge": gw.pg_port,
            "ssh_bridge": gw.bridge_port}[listener]


@pytest.mark.parametrize("first", ["nothing", "a partial first message"])
@pytest.mark.parametrize("listener", list(PARTIAL))
def test_clients_that_do_not_authenticate_in_time_are_disconnected(quick, tokens, askpass, listener, first):  # noqa: F811
    socks = hold_open(listener_port(quick, listener), 5, PARTIAL[listener] if first != "nothing" else b"")
    ports = [s.getsockname()[1] for s in socks]
    said = [until_closed(s) for s in socks]
    if listener == "ssh_bridge":  # its version line and key exchange offer, then the login timeout
        assert all(s.startswith(b"SSH-2.0-AsyncSSH") for s in said), said
    else:
        assert said == [b""] * 5  # closed without a word, as PostgreSQL does when authentication times out
    if listener in ("proxy", "approvals", "direct"):
        log = quick.log()
        assert all(f"closing the connection from ('127.0.0.1', {p}): no request within 1s" in log for p in ports)
    elif listener == "ssh_bridge":
        log = quick.ssh.log_file.read_text()
        assert all(f"('127.0.0.1', {p}): no login within 1s; disconnected" in log for p in ports)
    else:
        assert quick.pg.log_file.read_text().count("prod-db: no login within 1s; disconnected") >= 5
    assert serving(quick, tokens, askpass) == EVERY_LISTENER_SERVES


def test_a_keep_alive_connection_is_closed_once_idle(quick):
    with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as s:
        status, body = answer(s, head("GET http://api.test/items HTTP/1.1", [("Host", "api.test")]))
        assert (status, body["error"]) == (407, "unauthenticated")
        port = s.getsockname()[1]
        assert until_closed(s) == b""
    assert f"[127.0.0.1:{port}] Closing connection due to inactivity" in quick.log()


def test_a_request_held_for_approval_outlasts_the_idle_time(quick, servers, tokens):
    before, outcome = len(servers.upstream.received), {}
    manager = Approver(quick.approvals_url, tokens["manager"])
    agent = threading.Thread(target=lambda: outcome.update(
        r=quick.session(tokens["writer"]).post("http://api.test/held", json={"n": 1}, timeout=60)))
    agent.start()
    approval = wait_for(lambda: [a for a in manager.list() if a["rules"] == ["held-writes"]])[0]
    time.sleep(6)  # longer than the gateway's idle time (5s): the held connection sends nothing meanwhile
    assert manager.vote(approval["id"], "approve", "ok").status_code == 200
    agent.join(60)
    assert outcome["r"].status_code == 200 and outcome["r"].json()["path"] == "/held"
    assert len(servers.upstream.received) == before + 1


async def hold_after_the_watch_slept(watchdog_class) -> tuple[int, int]:
    """How often an idle watchdog (timeout 1s) fires during a 1.5s hook that began while it
    slept, with no event between, and in the 1.5s idle after the hook."""
    fired = []

    async def cut() -> None:
        fired.append(1)

    watchdog = watchdog_class(1, cut)
    watch = asyncio.create_task(watchdog.watch())
    await asyncio.sleep(0)  # the watch now sleeps until the last activity plus its timeout
    with watchdog.disarm():  # a request held for approval: no event until it is decided
        await asyncio.sleep(1.5)
    during = len(fired)
    await asyncio.sleep(1.5)
    watch.cancel()
    return during, len(fired) - during


@pytest.mark.parametrize("watchdog_class, during, after", [
    (HoldAwareWatchdog.__mro__[1], 1, 0),  # mitmproxy's own: cuts the held connection (fix ours when this fails)
    (HoldAwareWatchdog, 0, 1),  # the gateway's: waits for the hold, then cuts the connection once idle
])
def test_the_idle_watchdog_never_cuts_a_connection_while_a_hook_runs(watchdog_class, during, after):
    assert asyncio.run(hold_after_the_watch_slept(watchdog_class)) == (during, after)


def pg_connect(gw: Gateway, token: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=gw.pg_port, dbname="shop", user="agent", password=token,
                           sslmode="disable", connect_timeout=10, autocommit=True)


@pytest.mark.parametrize("begin, error, sqlstate, message", [
    (False, psycopg.errors.IdleSessionTimeout, "57P05", "terminating connection due to idle-session timeout"),
    (True, psycopg.errors.IdleInTransactionSessionTimeout, "25P03",
     "terminating connection due to idle-in-transaction timeout"),
])
def test_an_idle_postgres_session_ends_with_postgres_own_idle_error(quick, tokens, begin, error, sqlstate, message):
    with pg_connect(quick, tokens["writer"]) as c:
        if begin:
            c.execute("BEGIN")
        assert c.execute("SELECT 1").fetchone() == (1,)
        time.sleep(2.5)  # longer than the bridge's idle time (1.5s)
        with pytest.raises(error) as e:
            c.execute("SELECT 2")
    assert (e.value.sqlstate, e.value.diag.message_primary, e.value.diag.message_detail) == (
        sqlstate, message, "custody: no message for 1.5s (limits.idle of connection prod-db)")
    assert pg_read(quick, tokens["writer"]) == 200


def test_a_held_statement_outlasts_both_idle_times(quick, tokens, pg):  # noqa: F811
    dba, outcome = Approver(quick.approvals_url, tokens["dba"]), {}

    def writer():
        with pg_connect(quick, tokens["writer"]) as c:
            outcome["rows"] = c.execute("UPDATE users SET score = score WHERE id > 0").rowcount

    agent = threading.Thread(target=writer)
    agent.start()
    approval = wait_for(lambda: [a for a in dba.list() if a["rules"] == ["pg-large-writes-reviewed"]])[0]
    time.sleep(6)  # longer than the bridge's (1.5s) and the gateway's (5s) idle times
    assert dba.vote(approval["id"], "approve", "ok").status_code == 200
    agent.join(60)
    assert outcome["rows"] >= 300


def test_an_idle_ssh_connection_is_disconnected_but_never_a_running_or_held_command(quick, tokens, askpass):  # noqa: F811
    idle = ssh(quick, askpass, tokens["ops"], "-N", "", timeout=30)
    assert idle.returncode == 255
    assert b"custody: nothing ran for 1.5s (limits.idle); disconnected" in idle.stderr, idle.stderr
    running = ssh(quick, askpass, tokens["ops"], "sleep 2 && echo done")  # longer than the bridge's idle time
    assert (running.returncode, running.stdout) == (0, b"done\n"), running.stderr
    sre, outcome = Approver(quick.approvals_url, tokens["sre"]), {}
    held = threading.Thread(target=lambda: outcome.update(done=ssh(quick, askpass, tokens["ops"], "python3 -c 'print(7)'")))
    held.start()
    approval = wait_for(lambda: [a for a in sre.list() if "python3" in a["operation"]["summary"]])[0]
    time.sleep(2.5)  # longer than the bridge's idle time
    assert sre.vote(approval["id"], "approve", "ok").status_code == 200
    held.join(60)
    assert (outcome["done"].returncode, outcome["done"].stdout) == (0, b"7\n"), outcome["done"].stderr


# connections


LIMIT = {"proxy": 6, "approvals": 6, "direct": 3, "pg_bridge": 6, "ssh_bridge": 6}


def extra_client(gw: Gateway, listener: str, tokens: dict, askpass) -> str:  # noqa: F811
    """One more client past the limit: what it was told."""
    if listener == "pg_bridge":
        done = psql(gw.pg_port, tokens["writer"], "-c", "SELECT 1")
        return f"{done.returncode}: {done.stderr.strip()}"
    with socket.create_connection(("127.0.0.1", listener_port(gw, listener)), timeout=30) as s:
        port = s.getsockname()[1]
        said = until_closed(s)
    if listener == "ssh_bridge":  # asyncssh's version, then a disconnect before any key exchange
        log = gw.ssh.log_file.read_text()
        refused = f"ssh_bridge: refusing a connection from ('127.0.0.1', {port}): custody: too many connections (6"
        disconnect = said.startswith(b"SSH-2.0-AsyncSSH") and b"custody: too many connections (6, " in said
        return "disconnected" + (", refused" if refused in log and disconnect else "")
    refused = f"custody: refusing a connection from ('127.0.0.1', {port}): custody: {LIMIT[listener]} connections"
    return f"closed {said!r}" + (", refused" if refused in gw.log() else "")


REFUSED = {
    "proxy": "closed b'', refused",
    "approvals": "closed b'', refused",
    "direct": "closed b'', refused",
    "pg_bridge": "2: psql: error: connection to server at \"127.0.0.1\", port {port} failed: FATAL:  sorry, too many "
                 "clients already\nDETAIL:  custody: pg_bridge for prod-db accepts 6 connections (limits.connections)",
    "ssh_bridge": "disconnected, refused",
}


@pytest.mark.parametrize("listener", list(LIMIT))
def test_past_the_connection_limit_the_next_client_is_refused_and_the_listener_recovers(
        crowded, tokens, askpass, listener):  # noqa: F811
    held = hold_open(listener_port(crowded, listener), LIMIT[listener])
    try:
        expected = REFUSED[listener].format(port=listener_port(crowded, listener))
        assert extra_client(crowded, listener, tokens, askpass) == expected
        others = {k: v for k, v in serving(crowded, tokens, askpass).items() if k != listener}
        if listener == "proxy":  # the bridges reach the gateway through the proxy listener
            others = {k: v for k, v in others.items() if k not in ("pg_bridge", "ssh_bridge")}
        assert set(others.values()) == {200}, others  # every other listener serves meanwhile
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: serving(crowded, tokens, askpass) == EVERY_LISTENER_SERVES), "the listener did not recover"


# malformed protocol messages


NOT_UTF8 = [
    # (what, the request's own fields, status, error, what the record shows)
    # in JSON columns the escape reads back as the very character mitmproxy decoded; in plain
    # ones it is the escape's text (addons/engine/model.py storable)
    ("a header value", [b"X-Note: caf\xff"], 200, None, {"header": ["X-Note", "caf\udcff"]}),
    ("an asserted agent", [b"X-Custody-Agent: b\xffd"], 200, None, {"agent": "b\\udcffd"}),
    ("a refused request's header", [b"X-Note: caf\xff", b"Proxy-Authorization: Bearer x"], 407, "unauthenticated",
     {"header": ["X-Note", "caf\udcff"]}),
]


@pytest.mark.parametrize("what, fields, status, error, recorded", NOT_UTF8, ids=[c[0] for c in NOT_UTF8])
def test_bytes_that_are_not_utf8_are_decided_and_recorded_like_any_others(quick, servers, tokens, what, fields,
                                                                          status, error, recorded):
    """mitmproxy hands such bytes on as lone surrogates, which no UTF-8 encoder takes; the
    store records them all the same, or such a request (and every flow committed in the same
    transaction) would be refused with 503 audit_unavailable and nothing on record."""
    wait_for(lambda: "masking worker(s) ready" in quick.log())  # recorded header values are masked, not withheld
    auth = [] if status == 407 else [f"Proxy-Authorization: {basic(tokens['analyst'])}".encode()]
    before = len(servers.upstream.received)
    with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as s:
        got, body = answer(s, b"\r\n".join([b"GET http://api.test/items HTTP/1.1", b"Host: api.test", *auth, *fields])
                           + b"\r\n\r\n")
    assert (got, body.get("error")) == (status, error)
    assert len(servers.upstream.received) == before + (status == 200)
    event = quick.wait_events("kind = 'request' AND flow = (SELECT flow FROM events WHERE kind = 'decision' "
                              "ORDER BY seq DESC LIMIT 1)")[0]
    if "header" in recorded:
        assert recorded["header"] in json.loads(event["detail"])["headers"]
    else:
        assert event["agent"] == recorded["agent"]


FUZZ_CASES = 300
FUZZ_SEED = 20240611


def fuzz_port(gw: Gateway, listener: str, tokens: dict) -> list[tuple[bytes, bytes]]:
    """FUZZ_CASES malformed clients, 32 at a time: what each sent and was told. Bounded in
    count and time: each case ends within fuzz.send's timeout (15 s) or fails the test, so
    one port's fuzz takes at most ceil(FUZZ_CASES / 32) × 15 s."""
    rng = random.Random(f"{FUZZ_SEED}-{listener}")
    if listener in ("proxy", "approvals", "direct"):
        token = f"Proxy-Authorization: {basic(tokens['analyst'])}".encode() if listener == "proxy" else \
            f"Authorization: Bearer {tokens['analyst']}".encode()
        cases = [fuzz.http_case(rng).replace(fuzz.CREDENTIALS, token) for _ in range(FUZZ_CASES)]
    elif listener == "pg_bridge":
        cases = [fuzz.pg_case(rng, tokens["stranger"]) for _ in range(FUZZ_CASES)]
    else:
        cases = [fuzz.ssh_case(rng) for _ in range(FUZZ_CASES)]
    tls_host = "direct.test" if listener == "direct" else None
    answered = fuzz.http_answered if listener in ("proxy", "approvals", "direct") else None
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        said = list(pool.map(lambda data: fuzz.send(listener_port(gw, listener), data, tls_host, str(gw.ca), answered),
                             cases))
    return list(zip(cases, said))


def left_half_open(port: int) -> list[str]:
    """The server's sockets on `port` whose client has gone but which it never closed."""
    done = subprocess.run(["ss", "-Htn", "state", "close-wait", f"( sport = :{port} )"], capture_output=True,
                          text=True, timeout=10, check=True)
    return done.stdout.splitlines()


def custody_answers(said: bytes) -> list[dict]:
    """The gateway's own JSON refusals among the HTTP answers a client got."""
    return [json.loads(body) for _, _, body in fuzz.http_responses(said) if body.startswith(b'{"decision"')]


FAILURES = ("failed; refusing the flow", "audit store write failed", "Traceback")
"""What the gateway and the bridges log when something in them broke."""


def failures(gw: Gateway) -> list[int]:
    return [log.count(f) for log in (gw.log(), gw.pg.log_file.read_text(), gw.ssh.log_file.read_text())
            for f in FAILURES]


@pytest.mark.parametrize("listener", list(PARTIAL))
def test_a_fuzz_of_malformed_messages_reaches_nothing_and_leaves_the_listener_serving(
        quick, servers, pg, sshd, tokens, askpass, listener):  # noqa: F811
    upstream, logins, authorized = len(servers.upstream.received), sshd.accepted(), pg.log().count("connection authorized")
    seq, broken = max((e["seq"] for e in quick.events("1")), default=0), failures(quick)
    results = fuzz_port(quick, listener, tokens)
    assert quick.proc.poll() is None and quick.pg.proc.poll() is None and quick.ssh.proc.poll() is None
    assert failures(quick) == broken  # no addon raised, no write failed, no bridge task crashed
    assert left_half_open(listener_port(quick, listener)) == []  # every connection the server ended, it closed
    refusals = [a for _, said in results for a in custody_answers(said)]
    assert [a for a in refusals if a["error"] in GATEWAY_FAILURES] == []
    assert [a for a in refusals if quick.event(a["event_id"]) is None] == []  # every refusal answered is on record
    allowed = quick.events("seq > ? AND kind = 'decision' AND effect = 'allow' AND connection IN ('api', 'direct-api')",
                           [seq])
    assert len(servers.upstream.received) - upstream <= len(allowed)  # nothing went upstream without an allow on record
    assert (sshd.accepted(), pg.log().count("connection authorized")) == (logins, authorized)  # no backend reached
    assert serving(quick, tokens, askpass) == EVERY_LISTENER_SERVES
