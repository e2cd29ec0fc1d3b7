"""Faults and hostile input, with real processes: the gateway keeps serving, refuses what it
cannot do truthfully and fast, and heals without a restart when the cause goes away."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from examples.samples.pki import SigningKey
from tests.conftest import standard_identity
from tests.support.gateway import ROOT
from tests.support.servers import JwksServer
from tests.test_reconcile import pg  # noqa: F401  (the fixture: a real PostgreSQL)
from tests.test_ssh import sshd  # noqa: F401  (the fixture: a real sshd)


@pytest.fixture
def slow_idp():
    """A second identity provider, whose key endpoint can be made to answer a byte at a time."""
    key = SigningKey("slow-1", "RS256")
    server = JwksServer([key])
    server.key = key
    yield server
    server.stop()


def with_issuer(servers, idp: JwksServer, timeout: str) -> dict:
    identity = standard_identity(servers.jwks, jwks_timeout=timeout)
    identity["issuers"].append({"issuer": idp.issuer, "audience": "custody", "jwks_url": f"{idp.url}/jwks.json",
                                "leeway": 5})
    return identity


def test_a_flow_that_fails_while_the_gateway_starts_does_not_stop_it(make, servers, slow_idp, token, upstream):
    """The listeners open before startup ends (here: a slow identity provider's first fetch).
    A flow refused in that window because an addon failed is the flow's error, not a startup
    error: mitmproxy's errorcheck must not end the gateway for it."""
    slow_idp.drip = 0.02  # the first key fetch takes seconds: startup is still under way
    gw = make(identity=with_issuer(servers, slow_idp, "20s"),
              scripts=(str(ROOT / "tests" / "support" / "faults.py"),)).start()
    s = gw.session(token(groups=["analysts"]))
    before = len(upstream.received)
    failed = s.get("http://api.test/items/startup", headers={"X-Test-Fault": "policy"}, timeout=30)
    assert failed.status_code == 502 and failed.json()["error"] == "gateway_error"
    assert "Errors logged during startup" not in gw.log()
    deadline = time.monotonic() + 60
    while "custody: JWKS" not in gw.log() and slow_idp.hits < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    slow_idp.drip = 0.0
    time.sleep(1)  # past the end of startup, which would have ended the process
    ok = s.get("http://api.test/items/after-startup", timeout=30)
    assert gw.proc.poll() is None, gw.log()
    assert ok.status_code == 200 and len(upstream.received) == before + 1


def test_an_identity_provider_that_drips_never_holds_known_keys(make, servers, slow_idp, token, keys):
    """Its fetch ends by the deadline; a token whose key is known is answered while a fetch
    for an unknown key is still waiting; other issuers are untouched; it heals."""
    gw = make(identity=with_issuer(servers, slow_idp, "3s")).start()
    known = slow_idp.key.token(slow_idp.issuer, sub="known-key", groups=["analysts"])
    assert gw.session(known).get("http://api.test/items/known", timeout=30).status_code == 200
    rotated = SigningKey("slow-2", "RS256")
    slow_idp.keys, slow_idp.drip = [slow_idp.key, rotated], 0.05
    time.sleep(0.5)  # past jwks_min_interval (200ms in the standard identity)
    fresh = rotated.token(slow_idp.issuer, sub="new-key", groups=["analysts"])
    with ThreadPoolExecutor(4) as pool:
        waiting = pool.submit(lambda: gw.session(fresh).get("http://api.test/items/new", timeout=60))
        time.sleep(0.5)  # the fetch for slow-2 has started and is dripping
        meanwhile = [gw.session(known).get("http://api.test/items/known", timeout=30),
                     gw.session(token(groups=["analysts"])).get("http://api.test/items/other", timeout=30)]
        assert [r.status_code for r in meanwhile] == [200, 200]
        assert not waiting.done()  # answered while the unknown key's fetch still waits
        refused = waiting.result(timeout=60)
    assert refused.status_code == 407
    assert refused.json()["reason"].startswith("unknown signing key id 'slow-2' (JWKS unavailable: TimeoutError")
    slow_idp.drip = 0.0
    deadline = time.monotonic() + 30
    while (r := gw.session(fresh).get("http://api.test/items/new", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, r.text  # heals once the provider answers again
        time.sleep(0.5)
    assert requests.get(f"{slow_idp.url}/jwks.json", timeout=10).status_code == 200


# masking workers: killed idle, stopped busy, orphaned by a crash

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
MASKED = {"access.yaml": {"rules": [
    {"id": "analysts-read-masked", "match": {"connection": "api", "path": "/config/**", "principal": {"groups": ["analysts"]}},
     "effect": "allow", "masks": ["secrets"]},
    {"id": "analysts-read", "match": {"connection": "api", "principal": {"groups": ["analysts"]}, "action": "read"},
     "effect": "allow"}]}}


def masking_gateway(make, timeout: str = "4s"):
    gw = make(rules=MASKED)
    gw.config["masking"] = {"workers": 1, "timeout": timeout}
    gw.config_file.write_text(__import__("yaml").safe_dump(gw.config))
    return gw.start()


def big_secret(upstream, path: str) -> None:
    import json

    from tests.support.servers import Route

    body = json.dumps({"padding": "x" * 4000, "key": AWS_KEY}).encode()  # over the 1 KiB masked in-process
    upstream.routes[path] = Route("application/json", body)


def workers_of(gw) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "multiprocessing.spawn"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def masked_ok(gw, token, path: str, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while (r := gw.session(token).get(f"http://api.test{path}", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    return r


def test_a_worker_killed_while_idle_is_replaced_and_no_request_sees_it(make, upstream, token):
    import os
    import signal

    gw = masking_gateway(make)
    analyst = token(groups=["analysts"])
    big_secret(upstream, "/config/idle")
    assert AWS_KEY not in masked_ok(gw, analyst, "/config/idle").text
    for pid in workers_of(gw):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    r = gw.session(analyst).get("http://api.test/config/idle", timeout=30)
    assert r.status_code == 200 and AWS_KEY not in r.text and "[AWS_ACCESS_KEY_ID]" in r.text, (r.text, gw.log()[-3000:])  # tried on the new pool
    assert "restarting the masking workers: a worker died" in gw.log()
    assert gw.proc.poll() is None


def test_a_stopped_worker_answers_every_flow_restarts_once_and_heals(make, upstream, token):
    import os
    import signal

    gw = masking_gateway(make, timeout="3s")
    analyst = token(groups=["analysts"])
    big_secret(upstream, "/config/busy")
    masked_ok(gw, analyst, "/config/busy")
    for pid in workers_of(gw):
        os.kill(pid, signal.SIGSTOP)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: gw.session(analyst).get("http://api.test/config/busy", timeout=60), range(6)))
    assert all(r.status_code in (200, 502) for r in answers)  # every flow answered: none dropped
    refused = [r.json() for r in answers if r.status_code == 502]
    assert refused and all(d["error"] == "masking_unavailable" for d in refused)
    assert all(AWS_KEY not in r.text for r in answers)
    assert gw.log().count("restarting the masking workers: a job timed out") == 1
    responses = gw.wait_events("kind = 'response' AND resource = '/config/busy'")
    assert len(gw.events("kind = 'response' AND resource = '/config/busy'")) >= 7  # each flow's outcome on record
    assert AWS_KEY not in masked_ok(gw, analyst, "/config/busy").text  # and it heals, no restart of the gateway
    assert responses


def test_the_workers_of_a_gateway_killed_with_9_end_with_it(make, token, upstream):
    import os
    import signal

    gw = masking_gateway(make)
    big_secret(upstream, "/config/crash")
    masked_ok(gw, token(groups=["analysts"]), "/config/crash")
    workers = workers_of(gw)
    assert workers
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
              for pid in workers):
        assert time.monotonic() < deadline, f"orphaned masking workers still running: {workers}"
        time.sleep(0.2)


# the audit store locked by another process, or on a full disk

NOT_FORWARDED = ("deny", "audit_unavailable", False, "it could not be recorded, so nothing was forwarded; retry shortly")


def refused_while(gw, token, upstream, paths: list[str]) -> list[requests.Response]:
    """Requests sent together while the store cannot record: their answers, and nothing upstream."""
    before = len(upstream.received)
    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: gw.session(token).get(f"http://api.test{p}", timeout=60), paths))
    assert len(upstream.received) == before  # nothing was forwarded
    return answers


def assert_not_forwarded(answers: list[requests.Response], reason: str) -> None:
    for r in answers:
        assert r.status_code == 503, r.text  # never 502 "response withheld": nothing left the gateway
        body = r.json()
        assert (body["decision"], body["error"], body["forwarded"], body["hint"]) == NOT_FORWARDED
        assert body["reason"] == reason


def test_a_store_locked_by_another_process_refuses_fast_and_heals(make, token, upstream):
    import subprocess
    import sys

    gw = make().start()
    analyst = token(groups=["analysts"])
    assert gw.session(analyst).get("http://api.test/items/before-lock", timeout=30).status_code == 200
    holder = subprocess.Popen(  # another process holds the write lock (a backup, a stuck tool)
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
         "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read()", str(gw.db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        first = refused_while(gw, analyst, upstream, [f"/items/locked-{i}" for i in range(6)])
        then = refused_while(gw, analyst, upstream, [f"/items/still-locked-{i}" for i in range(6)])
        assert_not_forwarded(first + then, "audit store unavailable (OperationalError); nothing was forwarded")
    finally:
        holder.stdin.close()
        holder.wait(10)
    healed = gw.session(analyst).get("http://api.test/items/after-lock", timeout=30)
    assert healed.status_code == 200 and gw.proc.poll() is None  # no restart
    assert len(gw.events("kind = 'request' AND resource = '/items/after-lock'")) == 1
    assert gw.events("kind = 'request' AND resource LIKE '/items/%locked-%'") == []  # none ran, none on record
    assert gw.custody("audit", "verify", "--full").returncode == 0


def test_a_store_on_a_full_disk_refuses_and_heals_when_space_returns(make, token, upstream, tmp_path):
    import subprocess

    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        gw = make(store={"path": str(disk / "audit.db")})
        gw.db = disk / "audit.db"
        gw.start()
        analyst = token(groups=["analysts"])
        assert gw.session(analyst).get("http://api.test/items/before-full", timeout=30).status_code == 200
        filler = disk / "filler"
        with open(filler, "wb") as out:  # fill the disk to its last byte
            try:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            except OSError:
                pass
        answers = refused_while(gw, analyst, upstream, [f"/items/full-{i}" for i in range(6)])
        assert_not_forwarded(answers, "audit store unavailable (OperationalError); nothing was forwarded")
        filler.unlink()  # space returns
        healed = gw.session(analyst).get("http://api.test/items/after-full", timeout=30)
        assert healed.status_code == 200 and gw.proc.poll() is None
        assert len(gw.events("kind = 'request' AND resource = '/items/after-full'")) == 1
        assert gw.custody("audit", "verify", "--full").returncode == 0
        gw.stop()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# the database and the SSH host lost mid-session

def test_a_database_stopped_mid_session_ends_it_with_08006_and_the_bridge_recovers(make, pg, token):
    import psycopg

    from tests.support.pgbridge import BridgeProcess
    from tests.support.servers import free_port
    from tests.test_reconcile import gateway_for

    bridge_port = free_port()
    gw = gateway_for(make, pg, free_port(), bridge_port).start()
    bridge = BridgeProcess(gw, bridge_port, gw.dir / "bridge.log")
    agent = token(groups=["writers"], sub="db-loser")

    def connect() -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=bridge_port, dbname="shop", user="agent", password=agent,
                               sslmode="disable", autocommit=True, connect_timeout=10)

    try:
        c = connect()
        assert c.execute("SELECT 1").fetchone() == (1,)
        pg.halt()  # the whole server goes away, mid-session
        with pytest.raises(psycopg.OperationalError) as lost:
            c.execute("SELECT 2")
        assert lost.value.sqlstate == "08006" and "database connection failed" in str(lost.value)
        assert c.closed  # the bridge ended the connection, as a server that went away does
        with pytest.raises(psycopg.OperationalError) as down:  # while it is down: a clear refusal
            connect()
        assert "FATAL:  the gateway could not connect to the database: connection to server" in str(down.value)
        pg.start()
        with connect() as again:  # the same bridge and gateway, no restart
            assert again.execute("SELECT 3").fetchone() == (3,)
        assert gw.proc.poll() is None and bridge.proc.poll() is None
    finally:
        bridge.stop()


def test_an_ssh_host_stopped_mid_session_ends_it_clearly_and_a_new_session_works(make, sshd, token, tmp_path):
    import asyncio
    import subprocess

    import asyncssh

    from tests.support.pgbridge import BridgeProcess
    from tests.support.servers import free_port, wait_listening

    port = free_port()
    gw = make(rules={"ssh.yaml": {"rules": [{"id": "ops", "match": {"connection": "web", "principal": {
        "groups": ["ops"]}}, "effect": "allow"}]}})
    gw.config["connections"].append(
        {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}",
         "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"}, "listen": f"127.0.0.1:{port}",
         "host_key": str(tmp_path / "bridge_host_key"), "known_hosts": str(sshd.known_hosts)})
    gw.config_file.write_text(__import__("yaml").safe_dump(gw.config))
    gw.start()
    bridge = BridgeProcess(gw, port, tmp_path / "ssh-bridge.log", module="ssh_bridge")
    ops = token(groups=["ops"], sub="ssh-loser")

    async def session() -> tuple[str, str]:
        async with asyncssh.connect("127.0.0.1", port, username="agent+web", password=ops, known_hosts=None,
                                    client_keys=None, agent_path=None, config=None) as conn:
            first = await conn.run("echo before", timeout=30)
            stop_host(sshd)  # the host goes away: its listener and every session it serves
            try:
                after = await conn.run("echo after", timeout=30)
                return first.stdout, f"{after.exit_status}:{after.stderr}"
            except (asyncssh.Error, OSError) as e:
                return first.stdout, f"ended:{e}"

    try:
        before, after = asyncio.run(session())
        assert before == "before\n"
        assert re.fullmatch(r"255:custody: the connection to the SSH host was lost \(.+\); the command did not "
                            r"run: reconnect \(audit event: [0-9a-f]+\)\n", after), after
        sshd.proc = subprocess.Popen([sshd.proc.args[0], "-D", "-e", "-f", str(sshd.dir / "sshd_config")],
                                     stdout=open(sshd.log_file, "ab"), stderr=subprocess.STDOUT)
        wait_listening(sshd.port, sshd.proc, "sshd", sshd.log)

        async def again() -> str:
            async with asyncssh.connect("127.0.0.1", port, username="agent+web", password=ops, known_hosts=None,
                                        client_keys=None, agent_path=None, config=None) as conn:
                return (await conn.run("echo healed", timeout=30)).stdout

        assert asyncio.run(again()) == "healed\n"  # the same bridge and gateway, no restart
        assert gw.proc.poll() is None and bridge.proc.poll() is None
    finally:
        bridge.stop()


def stop_host(sshd) -> None:
    """Stop the sshd this test started, and the session processes it forked (by their ids)."""
    import os
    import signal
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(sshd.proc.pid)], capture_output=True, text=True).stdout.split()
    sshd.proc.kill()
    sshd.proc.wait(10)
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
