"""Several gateways, one truth: real `custody run` replicas over one real PostgreSQL store,
behind a real load balancer (haproxy), driven by real clients.

One hash chain across every replica, whatever they append at the same moment; approvals
held on one replica and decided on another; votes cast at the same instant on two
replicas; a replica killed with requests held; a rolling restart; the store going away
and coming back; workers sharing one port; a SQLite store migrated into PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from addons.engine.pgstore import PgStore
from addons.engine.store import Store
from examples.samples.postgres import PostgresServer
from tests.conftest import API_TOKEN
from tests.support.approvals import Approver, make_gateway, pending_for, send, wait_for
from tests.support.gateway import BIN, Gateway
from tests.support.haproxy import Haproxy
from tests.support.servers import free_port
from tests.test_ssh import sshd  # noqa: F401  (the fixture: a real sshd)

PASSWORD = "store-secret-9d2e"
HASH_KEY = "shared-masking-key-for-every-replica"
ENV = {"TEST_API_TOKEN": API_TOKEN, "CUSTODY_TEST_STORE_PASSWORD": PASSWORD, "CUSTODY_TEST_HASH_KEY": HASH_KEY}


@pytest.fixture(scope="module", autouse=True)
def environment():
    """The store's password, for the processes the tests start and for the tests' own reads."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(PASSWORD, log_statements=False)
    yield server
    server.stop()


databases = iter(range(1000))


def database(pg: PostgresServer) -> str:
    """A new empty database: its URL, without the password (the configuration names it)."""
    name = f"audit_{next(databases)}"
    pg.execute(f"CREATE DATABASE {name}")
    return f"postgresql://{pg.superuser}@127.0.0.1:{pg.port}/{name}"


def replica(directory: Path, servers, url: str, *, sweep: str = "200ms", lease: str = "2s", grace: str = "5s",
            rules: dict | None = None, **overrides) -> Gateway:
    """A `custody run` gateway on the PostgreSQL store at `url`, with the approval rules of
    tests/support/approvals.py, a fixed proxy port (a restart keeps it) and the masking key
    every replica shares."""
    overrides.setdefault("env", ENV)
    gw = make_gateway(directory, servers, runner="custody", port=free_port(),
                      store={"url": url, "password": "env:CUSTODY_TEST_STORE_PASSWORD"}, **overrides)
    gw.config["approvals"]["sweep"] = sweep
    gw.config["gateway"] = {"lease": lease, "grace": grace}
    gw.config["masking"] = {"hash_key": "env:CUSTODY_TEST_HASH_KEY"}
    if rules is not None:
        for name, document in rules.items():
            gw.write_rules(name, document)
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    return gw


def started(*gateways: Gateway) -> None:
    for gw in gateways:
        gw.start()
        wait_for(lambda: ready(gw), timeout=60)  # each worker loads Presidio first: slow on a busy 2-core host


def ready(gw: Gateway) -> bool:
    try:
        return requests.get(f"{gw.approvals_url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def replica_id(gw: Gateway) -> str:
    return requests.get(f"{gw.approvals_url}/readyz", timeout=5).json()["replica"]


def balancer(directory: Path, *gateways: Gateway) -> Haproxy:
    lb = Haproxy(directory, {"proxy": [g.listen_port for g in gateways],
                             "approvals": [int(g.approvals_url.rsplit(":", 1)[1]) for g in gateways]},
                 [g.listen_port for g in gateways])
    lb.proxy_url = lambda token: f"http://agent:{token}@127.0.0.1:{lb.ports['proxy']}"
    lb.approvals_url = f"http://127.0.0.1:{lb.ports['approvals']}"
    return lb


def through(lb: Haproxy, token: str) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": lb.proxy_url(token)}
    return s


def fresh(lb: Haproxy, token: str, path: str) -> requests.Response:
    """One request on a connection of its own (closed by the client after its answer):
    the balancer picks a replica for each."""
    with through(lb, token) as s:
        return s.get(f"http://api.test{path}", timeout=30)


def secret(url: str) -> str:
    """The store's URL with its password, as the configuration's `store.password` adds it."""
    return url.replace("@", f":{PASSWORD}@", 1)


def store_of(url: str) -> PgStore:
    return PgStore(secret(url))


def verify(gw: Gateway) -> subprocess.CompletedProcess:
    return gw.custody("audit", "verify", "--full")


@pytest.fixture(scope="module")
def pair(tmp_path_factory, servers, pg):
    """Replicas A and B on one store behind haproxy. A sweeps once a minute, so whatever it
    learns sooner about an approval another replica changed comes from the store's
    notifications (LISTEN/NOTIFY), never from its own polling; B sweeps often."""
    url = database(pg)
    root = tmp_path_factory.mktemp("pair")
    a = replica(root / "a", servers, url, sweep="60s", lease="3s")
    b = replica(root / "b", servers, url, sweep="200ms", lease="3s")
    started(a, b)
    lb = balancer(root / "lb", a, b)
    yield a, b, lb, url
    lb.stop()
    for gw in (a, b):
        gw.stop()


@pytest.fixture
def people(token):
    return {
        "buyer": token(sub="crew-buyer", groups=["buyers"]),
        "reader": token(sub="crew-reader", groups=["analysts"]),
        "m1": token(sub="manager-1", groups=["managers"]),
        "m2": token(sub="manager-2", groups=["managers"]),
    }


def reached(upstream, marker: str) -> list:
    return [g for g in upstream.received if marker.encode() in g.body]


# one chain


def test_every_replica_records_itself_and_both_append_to_one_chain(pair, people, upstream):
    a, b, lb, url = pair
    answers = [fresh(lb, people["reader"], f"/items/chain-{n}") for n in range(40)]
    assert [r.status_code for r in answers] == [200] * 40
    store = store_of(url)
    rows = store.where("kind = 'request' AND resource LIKE '/items/chain-%'", [])
    writers = {r["replica"] for r in rows}
    assert len(rows) == 40 and len(writers) == 2  # the balancer used both, and each event says which
    assert all(w.split("-")[-2].isdigit() for w in writers)  # host-pid-random
    assert verify(a).returncode == 0 and verify(a).stdout.startswith("ok: ")


WRITER = """
import sys
from addons.engine.pgstore import PgStore
from addons.engine.store import Event
store = PgStore(sys.argv[1], sys.argv[2], dedicated=True)
for i in range(300):
    store.append([Event(id=f"{sys.argv[2]}-{i}-{j}", kind="request", detail={"i": i}) for j in range(1 + i % 3)])
"""


def test_concurrent_writers_on_many_connections_never_fork_the_chain(pg):
    """Four processes appending as fast as they can: one chain, every event in it once."""
    url = database(pg)
    target = secret(url)
    procs = [subprocess.Popen([str(BIN / "python"), "-c", WRITER, target, f"w{n}"]) for n in range(4)]
    assert [p.wait(120) for p in procs] == [0] * 4
    store = store_of(url)
    result = store.verify()
    assert result.ok, result.problem
    assert result.count == 4 * sum(1 + i % 3 for i in range(300))
    assert len({r["id"] for r in store.rows()}) == result.count


# approvals across replicas


ELSEWHERE = [
    # where the approver acts (B's own approvals listener, or the balancer), the vote, what the agent gets
    pytest.param("b", "approve", 200, "executed", id="approved-on-the-other-replica"),
    pytest.param("lb", "deny", 403, "denied", id="denied-through-the-balancer"),
]


@pytest.mark.parametrize("where, vote, status, state", ELSEWHERE)
def test_a_request_held_on_one_replica_is_decided_on_another(pair, people, upstream, where, vote, status, state):
    a, b, lb, url = pair
    tag = f"decided-elsewhere-{where}"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, a, people["buyer"], "/restock", {"tag": tag})
        approver = Approver({"b": b, "lb": lb}[where].approvals_url, people["m1"])
        approval = pending_for(approver, tag)
        assert approval["replica"] == replica_id(a) and approval["held"] is True
        assert approver.vote(approval["id"], vote, "decided elsewhere").status_code == 200
        answer = held.result(timeout=20)  # A sweeps once a minute: only the store's notification wakes it
    assert answer.status_code == status and len(reached(upstream, tag)) == (status == 200)
    assert Approver(a.approvals_url, people["m1"]).show(approval["id"])["state"] == state
    steps = [e["detail"]["step"] for e in approver.show(approval["id"])["timeline"] if e["kind"] == "approval"]
    assert steps[0] == "requested" and ("approved" if vote == "approve" else "denied") in steps


VOTES = [
    # (the two votes cast at the same instant, on A and on B), the statuses, the state after
    pytest.param([("m1", "approve"), ("m2", "approve")], [200, 200], "approved", id="two-approvers-both-count"),
    pytest.param([("m1", "approve"), ("m1", "approve")], [200, 409], "pending", id="one-approver-counts-once"),
    pytest.param([("m1", "deny"), ("m2", "deny")], [200, 409], "denied", id="the-second-denial-finds-it-decided"),
    pytest.param([("buyer", "approve"), ("m1", "approve")], [200, 403], "pending", id="self-approval-on-either"),
]


@pytest.mark.parametrize("votes, statuses, state", VOTES)
def test_simultaneous_votes_on_two_replicas(pair, people, votes, statuses, state, upstream):
    """Quorum two: the row lock serialises the votes, each counted once, in some order."""
    a, b, lb, url = pair
    tag = f"simultaneous-{votes[0][0]}-{votes[1][0]}-{votes[0][1]}-{votes[1][1]}"
    with ThreadPoolExecutor(3) as pool:
        held = pool.submit(send, a, people["buyer"], "/orders", {"tag": tag})
        approval = pending_for(Approver(b.approvals_url, people["m1"]), tag)
        barrier = threading.Barrier(2)

        def vote(where: Gateway, who: str, how: str) -> requests.Response:
            approver = Approver(where.approvals_url, people[who])
            barrier.wait()
            return approver.vote(approval["id"], how, "at the same time")

        answers = [pool.submit(vote, gw, who, how) for gw, (who, how) in zip((a, b), votes)]
        got = sorted(f.result(timeout=20).status_code for f in answers)
        assert got == sorted(statuses)
        doc = Approver(b.approvals_url, people["m1"]).show(approval["id"])
        assert doc["state"] in (state, "executed")
        counted = [v["approver"] for v in doc["votes"]]
        assert len(counted) == len(set(counted)) == statuses.count(200)
        if state == "pending":
            Approver(a.approvals_url, people["m2"]).vote(approval["id"], "deny", "enough")
        outcome = held.result(timeout=20)
    assert outcome.status_code == (200 if state == "approved" else 403)
    assert len(reached(upstream, tag)) == (1 if state == "approved" else 0)


def test_an_approval_runs_once_when_its_request_is_resent_to_both_replicas_at_once(pair, people, upstream):
    a, b, lb, url = pair
    body = {"tag": "resent-twice"}
    first = send(a, people["buyer"], "/quick", body)  # held 1 s, then told it is pending
    approval_id = first.json()["approval_id"]
    assert Approver(b.approvals_url, people["m1"]).vote(approval_id, "approve").json()["state"] == "approved"
    barrier = threading.Barrier(2)

    def resend(gw: Gateway) -> requests.Response:
        barrier.wait()
        return send(gw, people["buyer"], "/quick", body)

    with ThreadPoolExecutor(2) as pool:
        answers = [f.result(timeout=30) for f in [pool.submit(resend, gw) for gw in (a, b)]]
    assert sorted(r.status_code for r in answers) == [200, 403]
    refused = next(r for r in answers if r.status_code == 403).json()
    assert refused["error"] == "approval_pending" and refused["approval_id"] != approval_id  # held anew
    assert len(reached(upstream, "resent-twice")) == 1
    assert Approver(a.approvals_url, people["m1"]).show(approval_id)["state"] == "executed"


# replicas and their health


def test_each_replica_answers_health_and_readiness(pair):
    a, b, lb, url = pair
    ids = set()
    for gw in (a, b):
        health = requests.get(f"{gw.approvals_url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = requests.get(f"{gw.approvals_url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["problems"] == []
        ids.add(ready.json()["replica"])
        assert health.headers["x-custody-replica"] == ready.json()["replica"]
    assert len(ids) == 2


def test_status_lists_the_live_replicas_and_warns_when_they_differ(pair):
    a, b, lb, url = pair
    out = a.custody("status", "--json")
    document = json.loads(out.stdout)
    listed = {r["id"]: r for r in document["replicas"]}
    assert len(listed) == 2 and all(r["live"] and r["state"] == "running" for r in listed.values())
    assert len({r["rules"] for r in listed.values()}) == 1  # the same rule files
    # A sweeps once a minute and B five times a second: their configurations differ, and status says so
    assert out.returncode == 1
    assert [w for w in document["warnings"] if w.startswith("the live replicas run 2 different configurations")]
    assert not [w for w in document["warnings"] if "rule sets" in w]


# a fleet: two replicas behind the balancer, with pg_bridge and ssh_bridge in front of it


APP_PASSWORD = "app-login-5b7c"
FLEET_RULES = {"fleet.yaml": {"rules": [
    {"id": "shop-reads", "match": {"connection": "shop-db", "action": "read"}, "effect": "allow"},
    {"id": "web-commands", "match": {"connection": "web", "principal": {"groups": ["ops"]},
                                     "action": ["read", "exec"]}, "effect": "allow"},
]}}


@pytest.fixture(scope="module")
def shop(pg):
    """A database agents reach through pg_bridge, and the login only the gateway holds."""
    pg.execute("CREATE DATABASE shop")
    pg.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    pg.execute("GRANT ALL ON SCHEMA public TO app", "shop")
    return pg


def shop_connection(pg: PostgresServer, port: int) -> dict:
    return {"name": "shop-db", "kind": "postgres", "hosts": ["db.shop.internal"],
            "upstream": f"postgresql://127.0.0.1:{pg.port}/shop", "listen": f"127.0.0.1:{port}",
            "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"}}


def bridged(port: int, token: str) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, dbname="shop", user="agent", password=token,
                           sslmode="disable", connect_timeout=10, autocommit=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, servers, shop, sshd):  # noqa: F811  (sshd: the fixture imported above)
    """Replicas A and B (lease 2 s, grace 5 s) behind haproxy, with a pg_bridge and an
    ssh_bridge whose gateway is the balancer."""
    from tests.support.pgbridge import BridgeProcess

    root, url = tmp_path_factory.mktemp("fleet"), database(shop)
    pg_port, ssh_port = free_port(), free_port()
    extra = [shop_connection(shop, pg_port),
             {"name": "web", "kind": "ssh", "hosts": ["web.internal"], "listen": f"127.0.0.1:{ssh_port}",
              "upstream": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}", "known_hosts": str(sshd.known_hosts),
              "credential": {"type": "private_key", "secret": f"file:{sshd.client_key}"},
              "host_key": str(root / "bridge_host_key")}]
    gateways = []
    for name in ("a", "b"):
        gw = replica(root / name, servers, url, rules=FLEET_RULES, env={**ENV, "PG_APP_PASSWORD": APP_PASSWORD})
        gw.config["connections"] += extra
        gw.config_file.write_text(yaml.safe_dump(gw.config))
        gateways.append(gw)
    started(*gateways)
    lb = balancer(root / "lb", *gateways)
    proxy = f"http://127.0.0.1:{lb.ports['proxy']}"
    bridges = [BridgeProcess(gateways[0], pg_port, root / "pg_bridge.log", proxy=proxy),
               BridgeProcess(gateways[0], ssh_port, root / "ssh_bridge.log", module="ssh_bridge", proxy=proxy)]
    yield {"a": gateways[0], "b": gateways[1], "lb": lb, "url": url, "pg_port": pg_port, "ssh_port": ssh_port}
    for process in [*bridges, lb, *gateways]:
        process.stop()


def restart(gw: Gateway) -> None:
    gw.start()
    wait_for(lambda: ready(gw))


class Load:
    """Agents reading through the balancer on keep-alive connections until stopped; every
    answer (or the exception instead of one) is kept."""

    def __init__(self, lb: Haproxy, token: str, tag: str, agents: int = 4) -> None:
        self.lb, self.token, self.tag = lb, token, tag
        self.answers: list = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(agents)]
        for t in self.threads:
            t.start()

    def run(self, n: int) -> None:
        session, i = through(self.lb, self.token), 0
        while not self.stopping.is_set():
            try:
                self.answers.append(session.get(f"http://api.test/items/{self.tag}-{n}-{i}", timeout=30).status_code)
            except requests.RequestException as e:
                self.answers.append(e)
            i += 1

    def stop(self) -> list:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        return self.answers


def test_an_approval_expires_once_though_every_replica_sweeps(fleet, people, upstream):
    """Both replicas look for expired approvals five times a second: one of them expires
    it, under its row lock; the other finds it expired already."""
    first = send(fleet["a"], people["buyer"], "/short", {"tag": "expires-once"})  # held 1 s, lives 2 s
    approval_id = first.json()["approval_id"]
    manager = Approver(fleet["b"].approvals_url, people["m1"])
    wait_for(lambda: manager.show(approval_id)["state"] == "expired", timeout=20)
    time.sleep(1)  # several more sweeps by both
    steps = [e["detail"]["step"] for e in manager.show(approval_id)["timeline"] if e["kind"] == "approval"]
    assert steps.count("expired") == 1
    assert manager.vote(approval_id, "approve").json()["error"] == "not_pending"
    assert send(fleet["b"], people["buyer"], "/short", {"tag": "expires-once"}).json()["approval_id"] != approval_id
    assert reached(upstream, "expires-once") == []


def test_a_stopping_replica_refuses_its_held_requests(fleet, people, upstream):
    a = fleet["a"]
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, a, people["buyer"], "/restock", {"tag": "held-at-stop"})
        approval = pending_for(Approver(fleet["b"].approvals_url, people["m1"]), "held-at-stop")
        a.stop()  # SIGTERM: a graceful stop
        answer = held.result(timeout=30)
    assert answer.status_code == 403
    assert (answer.json()["error"], answer.json()["state"]) == ("approval_abandoned", "abandoned")
    assert answer.json()["reason"] == "the gateway was stopped while the request was held"
    manager = Approver(fleet["b"].approvals_url, people["m1"])
    assert manager.show(approval["id"])["state"] == "abandoned"
    assert manager.vote(approval["id"], "approve").json()["error"] == "not_pending"
    assert reached(upstream, "held-at-stop") == []
    restart(a)


def test_a_rolling_restart_drops_no_allowed_request(fleet, people, token):
    """Agents keep reading through the balancer while A, then B, stop and start again.
    Bridge sessions opened before live on one replica: they end, clearly, with it."""
    import asyncssh

    lb = fleet["lb"]
    pg_session = bridged(fleet["pg_port"], people["reader"])
    assert pg_session.execute("SELECT 1").fetchone() == (1,)
    ops = token(sub="crew-ops", groups=["ops"])

    async def ssh_session():
        conn = await asyncssh.connect("127.0.0.1", fleet["ssh_port"], username="agent", password=ops,
                                      known_hosts=None)
        first = await conn.run("echo before", check=False)
        return conn, first

    loop = asyncio.new_event_loop()
    conn, first = loop.run_until_complete(ssh_session())
    assert (first.exit_status, first.stdout) == (0, "before\n"), first.stderr
    load = Load(lb, people["reader"], "rolling")
    try:
        wait_for(lambda: len(load.answers) > 20)
        for gw in (fleet["a"], fleet["b"]):
            gw.stop()
            assert gw.proc.returncode == 0  # it finished within its grace period
            restart(gw)
            wait_for(lambda: len(load.answers) > 20, timeout=5)
            time.sleep(1)  # the balancer sees it ready again (rise 2 x 200 ms)
    finally:
        answers = load.stop()
    assert [a for a in answers if a != 200] == [] and len(answers) > 100
    with pytest.raises(psycopg.OperationalError) as lost:
        pg_session.execute("SELECT 2")
    assert lost.value.sqlstate == "08006"
    assert "cannot continue on another gateway" in str(lost.value)
    second = loop.run_until_complete(conn.run("echo after", check=False))
    assert second.exit_status == 255 and "cannot continue on another gateway" in second.stderr
    assert "after" not in (second.stdout or "")
    conn.close()
    loop.close()
    store = store_of(fleet["url"])
    assert store.where("connection = 'web' AND kind = 'response' AND status = 200 AND body_size > 0 "
                       "AND id IN (SELECT id FROM events WHERE detail LIKE '%after%')", []) == []
    assert store.verify().ok


def test_every_stream_of_a_bridge_session_behind_the_balancer_runs_on_its_replica(fleet, token):
    """Each ssh command is a stream on a connection of its own, which the balancer (round
    robin) sends to either replica: the other refuses it at once (421 wrong_replica, on
    record, nothing run) and the bridge tries again until it reaches the session's."""
    import asyncssh

    async def commands():
        async with asyncssh.connect("127.0.0.1", fleet["ssh_port"], username="agent", known_hosts=None,
                                    password=token(sub="crew-ops", groups=["ops"])) as conn:
            return [await conn.run(f"echo step-{n}", check=False) for n in range(8)]

    store = store_of(fleet["url"])
    before = max((r["seq"] for r in store.tail(1)), default=0)  # the fleet served earlier tests too
    results = asyncio.run(commands())
    assert [(r.exit_status, r.stdout) for r in results] == [(0, f"step-{n}\n") for n in range(8)]
    refused = store.where("kind = 'response' AND status = 421 AND seq > ?", [before])
    assert refused, "the balancer never sent a stream to the other replica"
    assert {json.loads(r["body"])["error"] for r in refused} == {"wrong_replica"}
    ran = store.where("kind = 'request' AND operation LIKE '%step-%' AND seq > ?", [before])
    assert len({r["flow"] for r in ran}) == 8
    (home,) = {r["replica"] for r in ran}  # every command ran on the session's replica
    (other,) = {replica_id(fleet["a"]), replica_id(fleet["b"])} - {home}
    assert other in {r["replica"] for r in refused}  # (a session left by an earlier test may be refused too)


def test_a_bridge_session_outlives_its_idle_link_on_the_same_gateway(tmp_path, servers, shop, people):
    """The gateway closes a link left idle (limits.idle): the bridge opens it
    again, to the same gateway, and the session carries on on its own backend connection."""
    from tests.support.pgbridge import BridgeProcess

    port = free_port()
    gw = replica(tmp_path / "gw", servers, database(shop), rules=FLEET_RULES,
                 env={**ENV, "PG_APP_PASSWORD": APP_PASSWORD})
    gw.config["connections"].append(shop_connection(shop, port))
    gw.config["limits"] = {"idle": "1s"}  # the gateway's listeners: mitmproxy's tcp_timeout
    gw.config["connections"][-1]["limits"] = {"idle": "10m"}  # the bridge's own clients may idle
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    started(gw)
    bridge = BridgeProcess(gw, port, tmp_path / "bridge.log")
    try:
        with bridged(port, people["reader"]) as session:
            backend = session.execute("SELECT pg_backend_pid()").fetchone()
            wait_for(lambda: "Closing connection due to inactivity" in gw.log(), timeout=20)
            assert session.execute("SELECT pg_backend_pid()").fetchone() == backend
    finally:
        bridge.stop()
        gw.stop()


def test_a_replica_killed_under_load(fleet, people, upstream):
    """kill -9 of A while agents read through the balancer and A holds a request: the chain
    verifies, nothing reached the upstream without its request and decision on record, and
    B abandons what A held; nobody can ever run it."""
    a, b, lb = fleet["a"], fleet["b"], fleet["lb"]
    a_id = replica_id(a)
    load = Load(lb, people["reader"], "killed")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, a, people["buyer"], "/restock", {"tag": "held-when-killed"})
        manager = Approver(b.approvals_url, people["m1"])
        approval = pending_for(manager, "held-when-killed")
        wait_for(lambda: len(load.answers) > 20)
        a.kill()
        with pytest.raises(requests.RequestException):
            held.result(timeout=30)
        lost = wait_for(lambda: (doc := manager.show(approval["id"]))["state"] == "abandoned" and doc, timeout=30)
        wait_for(lambda: len(load.answers) > 60, timeout=30)
    load.stop()
    assert lost["outcome"].startswith(f"gateway replica {a_id} was lost while the request was held")
    assert manager.vote(approval["id"], "approve").json()["error"] == "not_pending"
    assert reached(upstream, "held-when-killed") == []
    store = store_of(fleet["url"])
    assert store.verify().ok
    recorded = {(r["kind"], r["resource"]) for r in store.where("resource LIKE '/items/killed-%'", [])}
    executed = {g.path for g in upstream.received if g.path.startswith("/items/killed-")}
    assert executed and all(("request", p) in recorded and ("decision", p) in recorded for p in executed)
    restart(a)


def test_a_replica_that_stops_answering_loses_its_holds_when_its_lease_lapses(fleet, people, upstream):
    """A frozen replica (SIGSTOP: its process is there, its heartbeat is not): once its
    lease lapses, B abandons what it held; thawed, it refuses the request, never runs it."""
    a, b = fleet["a"], fleet["b"]
    a_id = replica_id(a)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, a, people["buyer"], "/restock", {"tag": "held-when-frozen"})
        manager = Approver(b.approvals_url, people["m1"])
        approval = pending_for(manager, "held-when-frozen")
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            lost = wait_for(lambda: (doc := manager.show(approval["id"]))["state"] == "abandoned" and doc, timeout=30)
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        answer = held.result(timeout=30)
    assert lost["outcome"].startswith(f"gateway replica {a_id} was lost while the request was held (no heartbeat for")
    assert (answer.status_code, answer.json()["error"]) == (403, "approval_abandoned")
    assert reached(upstream, "held-when-frozen") == []


# the store going away


def test_while_the_store_is_down_requests_are_refused_and_it_heals(tmp_path, servers, people, upstream):
    own = PostgresServer(PASSWORD, log_statements=False)
    try:
        gw = replica(tmp_path / "gw", servers, database(own))
        started(gw)
        agent = gw.session(people["reader"])
        assert agent.get("http://api.test/items/store-before", timeout=30).status_code == 200
        own.halt()
        refused = agent.get("http://api.test/items/store-down", timeout=30)
        assert refused.status_code == 503 and refused.json()["error"] == "audit_unavailable"
        assert not [g for g in upstream.received if g.path == "/items/store-down"]  # nothing was forwarded
        unready = requests.get(f"{gw.approvals_url}/readyz", timeout=10)
        assert unready.status_code == 503
        assert [p for p in unready.json()["problems"] if p.startswith("the audit store is unavailable")]
        own.start()
        healed = wait_for(lambda: agent.get("http://api.test/items/store-back", timeout=30).status_code == 200, 30)
        assert healed and gw.proc.poll() is None  # the same process: no restart
        wait_for(lambda: ready(gw), timeout=30)
        assert verify(gw).returncode == 0
        gw.stop()
    finally:
        own.stop()


# workers on one host


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_share_one_port(tmp_path, servers, pg, people, upstream, kind):
    """`custody run --workers 2`: two replicas on one port; new connections reach both, they
    agree on what they run, a request held by one is approved whichever one the approver
    reaches, and SIGTERM stops them all."""
    if kind == "sqlite":
        gw = make_gateway(tmp_path, servers, runner="custody", port=free_port(), run_args=("--workers", "2"))
    else:
        gw = replica(tmp_path, servers, database(pg), run_args=("--workers", "2"))
    started(gw)
    for n in range(30):  # each on a connection of its own: the kernel picks a worker for each
        with gw.session(people["reader"]) as agent:
            assert agent.get(f"http://api.test/items/worker-{kind}-{n}", timeout=30).status_code == 200
    store = gw.store()
    writers = {r["replica"] for r in store.where("resource LIKE ?", [f"/items/worker-{kind}-%"])}
    assert len(writers) == 2
    status = gw.custody("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert {r["id"] for r in json.loads(status.stdout)["replicas"]} == writers
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(send, gw, people["buyer"], "/restock", {"tag": f"workers-{kind}"})
        manager = Approver(gw.approvals_url, people["m1"])
        approval = pending_for(manager, f"workers-{kind}")
        assert manager.vote(approval["id"], "approve").json()["state"] == "approved"
        assert held.result(timeout=30).status_code == 200
    assert len(reached(upstream, f"workers-{kind}")) == 1
    gw.stop()
    assert gw.proc.returncode == 0
    assert store.verify().ok


# migration


def test_a_sqlite_store_migrates_into_postgresql_and_still_verifies(tmp_path, pg):
    from tests.test_store import LEGACY, populate

    db = tmp_path / "audit.db"
    subprocess.run([str(BIN / "python"), "-c", LEGACY, str(db), "2"], check=True)  # three version 2 events
    populate(db, 5, "v3-")
    Store(str(db)).close()
    audit = lambda *args: subprocess.run([str(BIN / "custody"), "audit", *args], capture_output=True, text=True,
                                         cwd=tmp_path, timeout=60)
    pruned = audit("prune", "--db", str(db), "--before", "2024-01-01T00:00:00Z", "--no-archive")
    assert pruned.returncode == 0 and "\npruned 3 events (1–3, " in pruned.stdout, pruned.stdout + pruned.stderr
    assert audit("verify", "--db", str(db)).returncode == 0  # an anchor too
    target = secret(database(pg))
    moved = audit("migrate", "--db", str(db), "--to", target)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    source, copy = Store(str(db)), PgStore(target)
    assert moved.stdout.startswith(f"copied {len(list(source.rows()))} events from {db} to ")
    assert [r["hash"] for r in copy.rows()] == [r["hash"] for r in source.rows()]
    assert copy.head() == source.head() and copy.checkpoints() == source.checkpoints()
    assert copy.anchors() == source.anchors()
    ok = audit("verify", "--db", target)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stdout
    assert "checkpoint: events 1–3 pruned" in ok.stdout
    again = audit("migrate", "--db", str(db), "--to", target)
    assert again.returncode == 1 and "already holds an audit log: migrate into an empty store" in again.stderr
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("UPDATE events SET reason = 'edited' WHERE seq = 6")
    broken = audit("verify", "--db", target, "--full")
    assert broken.returncode == 1 and broken.stdout.startswith("BROKEN at event 6: event contents do not match")


# what a lapsed replica is (pure)


HOLDERS = [
    # (the holder's row, trust the age, starting), the outcome its approval is abandoned with (None: kept)
    ({"replica": None, "state": None}, True, False, "the gateway restarted while the request was held"),
    ({"replica": "r1", "state": None}, True, False, "the gateway restarted while the request was held"),
    ({"replica": "r1", "state": "stopped", "host": "elsewhere", "pid": 1, "age": 0.1}, True, False,
     "the gateway was stopped while the request was held"),
    ({"replica": "r1", "state": "running", "host": "here", "pid": 0, "age": 0.1}, False, True,
     "the gateway restarted while the request was held"),
    ({"replica": "r1", "state": "running", "host": "here", "pid": 0, "age": 0.1}, False, False,
     "gateway replica r1 was lost while the request was held (its process is gone)"),
    ({"replica": "r1", "state": "running", "host": "here", "pid": os.getpid(), "age": 0.1}, True, False, None),
    ({"replica": "r1", "state": "running", "host": "elsewhere", "pid": 1, "age": 9.0}, True, False,
     "gateway replica r1 was lost while the request was held (no heartbeat for 9s)"),
    ({"replica": "r1", "state": "draining", "host": "elsewhere", "pid": 1, "age": 9.0}, True, False,
     "gateway replica r1 was lost while the request was held (no heartbeat for 9s)"),
    # the judge itself was cut off from the store lately: a silent heartbeat proves nothing yet
    ({"replica": "r1", "state": "running", "host": "elsewhere", "pid": 1, "age": 9.0}, False, False, None),
    ({"replica": "r1", "state": "running", "host": "elsewhere", "pid": 1, "age": 4.9}, True, False, None),
    # another replica reconciled it: lost for good, with the why this one can see, whichever came first
    ({"replica": "r1", "state": "reconciled", "host": "elsewhere", "pid": 1, "age": 9.0}, True, False,
     "gateway replica r1 was lost while the request was held (no heartbeat for 9s)"),
    ({"replica": "r1", "state": "reconciled", "host": "elsewhere", "pid": 1, "age": 9.0}, False, False,
     "gateway replica r1 was lost while the request was held (its flows were reconciled)"),
    ({"replica": "r1", "state": "reconciled", "host": "here", "pid": 0, "age": 0.1}, True, False,
     "gateway replica r1 was lost while the request was held (its process is gone)"),
]


@pytest.mark.parametrize("holder, trust_age, starting, outcome", HOLDERS)
def test_when_a_holder_counts_as_lost(holder, trust_age, starting, outcome):
    from addons.engine.replicas import lapsed

    assert lapsed(holder, 5.0, "here", trust_age, starting) == outcome


def test_disagreements_name_what_differs_and_who():
    from addons.engine.replicas import disagreements

    same = [{"id": "r1", "rules": "aa", "config": "cc"}, {"id": "r2", "rules": "aa", "config": "cc"}]
    assert disagreements(same) == []
    differ = [{"id": "r1", "rules": "aa", "config": "cc"}, {"id": "r2", "rules": "bb", "config": "cc"}]
    assert disagreements(differ) == ["the live replicas run 2 different rule sets (aa: r1; bb: r2)"]


# the PostgreSQL store behind the same interface


TAMPERING = [
    ("UPDATE events SET reason = 'approved' WHERE seq = 2", "BROKEN at event 2: event contents do not match its hash"),
    ("UPDATE events SET replica = 'someone-else' WHERE seq = 3", "BROKEN at event 3: event contents do not match"),
    ("UPDATE events SET replica = NULL WHERE seq = 3", "BROKEN at event 3: event contents do not match its hash"),
    ("DELETE FROM events WHERE seq = 2", "BROKEN at event 3: event 2 is missing (found 3)"),
    ("DELETE FROM events WHERE seq = 5", "BROKEN at event 5: chain head says 5 events but the log ends at 4"),
    ("UPDATE bodies SET data = '\\x00'", "BROKEN at event 1: body does not match its digest"),
]


@pytest.mark.parametrize("tamper, says", TAMPERING)
def test_verify_finds_tampering_in_the_postgresql_store(pg, tamper, says, tmp_path):
    from addons.engine.model import Decision, Operation, Principal
    from addons.engine.store import Event

    url = secret(database(pg))
    store = PgStore(url, "r-test", dedicated=True)
    for i in range(5):
        store.append([Event(id=f"t{i}", kind="request", session="s", flow=f"f{i}", principal=Principal("crew", "idp"),
                            operation=Operation("http", "api", "read", f"/items/{i}", 10, "GET"),
                            decision=Decision("allow", ("r",), "ok"), body=b"the same body " * 10)])
    verify = lambda: subprocess.run([str(BIN / "custody"), "audit", "verify", "--db", url, "--full"],
                                    capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert verify().stdout.startswith("ok: 5 events, chain head ")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(tamper)
    broken = verify()
    assert broken.returncode == 1 and broken.stdout.startswith(says), broken.stdout


def test_the_cli_reads_the_postgresql_store_as_it_reads_sqlite(pair, people, tmp_path):
    a, b, lb, url = pair
    assert fresh(lb, people["reader"], "/items/for-the-cli").status_code == 200
    tail = a.custody("audit", "tail", "-n", "50")
    assert tail.returncode == 0 and "/items/for-the-cli" in tail.stdout
    sessions = json.loads(a.custody("audit", "sessions", "--json", "-n", "200").stdout)
    assert any(s["subjects"] == "crew-reader" and s["requests"] >= 1 for s in sessions)
    export = tmp_path / "out.jsonl"
    done = a.custody("audit", "export", "--format", "jsonl", "-o", str(export), "--principal", "crew-reader",
                     "--signing-key", str(tmp_path / "k.key"))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in export.read_text().splitlines()]
    assert records and {r["replica"] for r in records} <= {r["replica"] for r in store_of(url).rows()}
    checked = a.custody("audit", "verify", "--export", str(export), "--public-key", str(tmp_path / "k.key"))
    assert checked.returncode == 0 and "events match the store" in checked.stdout, checked.stdout
    report = a.custody("audit", "report", "--from", "2020-01-01", "-o", str(tmp_path / "report"))
    assert report.returncode == 0 and json.loads((tmp_path / "report.json").read_text())["totals"]["requests"] >= 1


# the store's configuration


STORE_SETTINGS = [
    # (store section, what `store.password`'s file holds), the password the store is opened with, or the error
    ({"url": "postgresql://audit@db.internal:5432/custody", "password": "file:pw"}, "from-a-file", None),
    ({"url": "postgresql://audit@db.internal/custody", "password": "env:CUSTODY_TEST_STORE_PASSWORD"}, PASSWORD, None),
    ({"url": "env:CUSTODY_TEST_URL"}, "in-the-url", None),
    ({"url": "postgresql://audit:hunter2@db.internal/custody"}, None,
     "store.url: no password in the file; use store.password: env:NAME or file:PATH"),
    ({"url": "postgresql://audit@db.internal/custody", "password": "hunter2"}, None,
     "store.password: 'hunter2' does not match"),
    ({"url": "mysql://db.internal/custody"}, None, "store.url: 'mysql://db.internal/custody' does not match"),
    ({"path": "audit.db", "url": "postgresql://db.internal/custody"}, None,
     "store: path (SQLite) and url (PostgreSQL) exclude each other"),
]


@pytest.mark.parametrize("section, password, error", STORE_SETTINGS)
def test_the_store_names_its_password_only_by_reference(tmp_path, monkeypatch, section, password, error):
    from psycopg.conninfo import conninfo_to_dict

    from addons.engine import config
    from addons.engine.store import resolve

    (tmp_path / "pw").write_text("from-a-file\n")
    monkeypatch.setenv("CUSTODY_TEST_URL", "postgresql://audit:in-the-url@db.internal/custody")
    raw = {"connections": [{"name": "api", "kind": "http", "hosts": ["api.test"]}], "rules": "rules", "store": section}
    if error:
        with pytest.raises(config.ConfigError, match=re.escape(error)):
            config.parse(raw, str(tmp_path / "custody.yaml"))
        return
    cfg = config.parse(raw, str(tmp_path / "custody.yaml"), secrets=False)
    assert cfg.store.path == "" and cfg.store.directory == tmp_path  # local keys live beside the configuration
    assert conninfo_to_dict(resolve(cfg.store))["password"] == password
