"""After a crash the trail says what really ran: a real mitmdump gateway killed with -9
under concurrent HTTP and SQL writes (real PostgreSQL, real pg_bridge, real psycopg and
requests), then started again (twice at once, on the same store). What the backends
executed is compared with the audit trail: every executed write has its request and
decision on record, every open flow is closed by one `interrupted` event, the SQL
responses of the transaction the crash rolled back are named, and the chain verifies."""

from __future__ import annotations

import json
import os
import threading
import time

import psycopg
import pytest
import requests
import yaml

from addons.engine.reconcile import INTERRUPTED, RECONCILED, ROLLED_BACK, Transaction, gone, open_transactions, plan
from examples.samples.postgres import PostgresServer
from tests.conftest import STANDARD_RULES
from tests.support.gateway import Gateway
from tests.support.pgbridge import BridgeProcess
from tests.support.servers import Route, free_port

APP_PASSWORD = "app-Passw0rd-reconcile"
STORE_PASSWORD = "admin-pw-reconcile"  # the server's superuser: the PostgreSQL audit stores' login
SQL_RULES = {"rules": [{"id": "sql-writers", "match": {"connection": "shop-db", "principal": {"groups": ["writers"]}},
                        "effect": "allow"}]}


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(STORE_PASSWORD, log_statements=False)
    server.execute("CREATE DATABASE shop")
    server.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    server.execute("GRANT ALL ON SCHEMA public TO app", "shop")
    with psycopg.connect(server.dsn("shop", "app", APP_PASSWORD), autocommit=True) as c:
        c.execute("CREATE TABLE writes (tag text PRIMARY KEY)")
    yield server
    server.stop()


stores = iter(range(1000))


def gateway_for(make, pg, port: int, bridge_port: int, store: str = "sqlite") -> Gateway:
    """A gateway with the HTTP API and the shop database, on a SQLite store or on a new
    PostgreSQL store (a database of its own on the same server)."""
    if store == "postgresql":
        name = f"audit_{next(stores)}"
        pg.execute(f"CREATE DATABASE {name}")
        store = {"url": f"postgresql://{pg.superuser}@127.0.0.1:{pg.port}/{name}",
                 "password": "env:CUSTODY_TEST_STORE_PASSWORD"}
    gw = make(rules={**STANDARD_RULES, "sql.yaml": SQL_RULES}, port=port,
              store=store if isinstance(store, dict) else None,
              env={"TEST_API_TOKEN": "unused", "PG_APP_PASSWORD": APP_PASSWORD,
                   "CUSTODY_TEST_STORE_PASSWORD": STORE_PASSWORD})
    gw.config["connections"].append(
        {"name": "shop-db", "kind": "postgres", "hosts": ["db.shop.internal"],
         "upstream": f"postgresql://127.0.0.1:{pg.port}/shop",
         "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"},
         "listen": f"127.0.0.1:{bridge_port}"})
    gw.config["gateway"] = {"lease": "2s"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    return gw


def twin(gw: Gateway, port: int) -> Gateway:
    """A second gateway process on the first one's configuration and store."""
    other = Gateway.__new__(Gateway)
    other.__dict__.update(gw.__dict__)
    other.listen_port, other.proc, other.log_file = port, None, gw.dir / f"gateway-{port}.log"
    return other


class Writers(threading.Thread):
    """An agent writing as fast as it can until stopped or cut off: SQL inserts (autocommit)
    through the bridge, or HTTP POSTs through the proxy; keeps the tags it was told ran."""

    def __init__(self, kind: str, name: str, gw: Gateway, token: str, bridge_port: int) -> None:
        super().__init__(daemon=True)
        self.kind, self.name, self.gw, self.token, self.bridge_port = kind, name, gw, token, bridge_port
        self.confirmed: list[str] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        n = 0
        try:
            if self.kind == "sql":
                with psycopg.connect(host="127.0.0.1", port=self.bridge_port, dbname="shop", user="agent",
                                     password=self.token, sslmode="disable", autocommit=True, connect_timeout=10) as c:
                    while not self.stop.is_set():
                        tag = f"{self.name}-{n}"
                        c.execute(f"INSERT INTO writes VALUES ('{tag}')")
                        self.confirmed.append(tag)
                        n += 1
            else:
                s = self.gw.session(self.token)
                while not self.stop.is_set():
                    tag = f"{self.name}-{n}"
                    if s.post(f"http://api.test/items/{tag}", json={"tag": tag}, timeout=10).status_code == 200:
                        self.confirmed.append(tag)
                    n += 1
        except (psycopg.Error, requests.RequestException, OSError):
            pass  # the gateway died under it (anything else is the test's own bug: it shows)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_gateway_killed_under_writes_is_reconciled_on_restart(make, pg, upstream, token, store, monkeypatch):
    monkeypatch.setenv("CUSTODY_TEST_STORE_PASSWORD", STORE_PASSWORD)  # the tests' own reads of the store
    pg.execute("TRUNCATE writes", "shop")  # what this test's agents execute, and nothing else
    received = len(upstream.received)
    port, bridge_port = free_port(), free_port()
    gw = gateway_for(make, pg, port, bridge_port, store).start()
    bridge = BridgeProcess(gw, bridge_port, gw.dir / "bridge.log")
    writer = token(groups=["writers", "analysts"], sub="reconcile-writer")
    upstream.routes["/items/slow"] = Route("application/json", chunks=[b"{", b"}"], gates={1: threading.Event()})
    try:
        # a transaction that has written and is still open when the gateway dies
        open_tx = psycopg.connect(host="127.0.0.1", port=bridge_port, dbname="shop", user="agent", password=writer,
                                  sslmode="disable", connect_timeout=10)
        open_tx.execute("INSERT INTO writes VALUES ('in-open-transaction')")
        assert open_tx.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        # a request whose upstream answered its headers and never finished its body
        slow = threading.Thread(target=lambda: _quietly(lambda: gw.session(writer).get(
            "http://api.test/items/slow", timeout=60)), daemon=True)
        slow.start()
        agents = [Writers("sql", f"sql{i}", gw, writer, bridge_port) for i in range(3)] + \
                 [Writers("http", f"http{i}", gw, writer, bridge_port) for i in range(3)]
        deadline = time.monotonic() + 30
        while sum(len(a.confirmed) for a in agents) < 60:
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        gw.kill()  # kill -9, mid-write
        for a in agents:
            a.stop.set()
            a.join(20)
        open_tx.close()
        dead = {r["id"] for r in _replicas(gw)}
        assert len(dead) == 1

        # two gateways start together on the same store: the dead one is reconciled once
        again, other = twin(gw, port), twin(gw, free_port())
        again.start()
        other.start()
        reconciled = gw.wait_events(f"kind = '{RECONCILED}'", timeout=30)
        time.sleep(1.5)  # both have had several beats: a second reconcile would be on record by now
        assert len(gw.events(f"kind = '{RECONCILED}'")) == 1, (again.log(), other.log())
        summary = json.loads(reconciled[0]["detail"])
        assert (summary["replica"], summary["why"]) == (dead.pop(), "its process is gone")

        # what the backends executed has its request and an allow decision on record
        with pg.connect("shop") as c:
            executed = {tag for (tag,) in c.execute("SELECT tag FROM writes")}
        assert "in-open-transaction" not in executed  # the crash rolled it back
        for tag in executed:
            assert _allowed(gw, "operation LIKE ?", f"%INSERT INTO writes VALUES ('{tag}')%"), tag
        reached = {r.path.rsplit("/", 1)[-1] for r in upstream.received[received:] if r.method == "POST"}
        for tag in reached & {f"http{i}-{n}" for i in range(3) for n in range(10000)}:
            assert _allowed(gw, "resource = ?", f"/items/{tag}"), tag
        confirmed = {t for a in agents for t in a.confirmed}
        assert {t for t in confirmed if t.startswith("sql")} <= executed  # nothing confirmed that did not run

        # every flow of the dead replica is closed, by exactly one outcome
        assert _open_flows(gw, summary["replica"]) == []
        interrupted = gw.events(f"kind = '{INTERRUPTED}'")
        assert len(interrupted) == summary["interrupted"] >= 1
        assert len({e["flow"] for e in interrupted}) == len(interrupted)
        slow_flow = [e for e in interrupted if json.loads(e["detail"])["request"] in
                     {r["id"] for r in gw.events("kind = 'request' AND resource = '/items/slow'")}]
        assert len(slow_flow) == 1 and json.loads(slow_flow[0]["detail"])["outcome"] == "unknown"

        # the open transaction: its INSERT 0 1 is named as rolled back, its id looked up
        inserted = [e for e in gw.events("kind = 'response' AND json_extract(detail, '$.transaction.xid') IS NOT NULL")]
        assert len(inserted) == 1 and summary["rolled_back"] == [inserted[0]["id"]]
        xid = json.loads(inserted[0]["detail"])["transaction"]["xid"]
        assert {"xid": xid, "status": "rolled back", "connection": "shop-db"}.items() <= \
            summary["transactions"][0].items()

        rolled = gw.events(f"kind = '{ROLLED_BACK}'")
        assert [(e["session"], json.loads(e["detail"])["responses"]) for e in rolled] == \
            [(inserted[0]["session"], [inserted[0]["id"]])]

        # the trail verifies, and a replay shows what happened
        verified = gw.custody("audit", "verify", "--full")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        shown = gw.custody("audit", "replay", slow_flow[0]["session"])
        assert "INTERRUPTED  outcome unknown: the gateway stopped before the outcome was recorded" in shown.stdout, \
            shown.stdout + shown.stderr
        shown = gw.custody("audit", "replay", inserted[0]["session"])
        assert f"ROLLED BACK  transaction {xid} never committed: the 1 responses" in shown.stdout, shown.stdout
    finally:
        bridge.stop()
        for g in (locals().get("again"), locals().get("other")):
            if g is not None:
                g.stop()


def test_a_flow_of_a_replica_that_is_alive_is_not_interrupted(make, pg, upstream, token):
    """Another replica starting (or reconciling) never closes a live replica's open flow."""
    gw = gateway_for(make, pg, free_port(), free_port()).start()
    gate = threading.Event()
    upstream.routes["/items/held-open"] = Route("application/json", chunks=[b"{", b"}"], gates={1: gate})
    slow = threading.Thread(target=lambda: _quietly(lambda: gw.session(token(groups=["analysts"])).get(
        "http://api.test/items/held-open", timeout=60)), daemon=True)
    slow.start()
    assert gw.wait_events("kind = 'decision' AND resource = '/items/held-open'")
    other = twin(gw, free_port()).start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # several of the newcomer's beats (lease 2s: every 0.5s)
            time.sleep(0.5)
        assert gw.events(f"kind IN ('{INTERRUPTED}', '{RECONCILED}')") == []
        gate.set()
        slow.join(30)
        assert len(gw.wait_events("kind = 'response' AND resource = '/items/held-open'")) == 1
    finally:
        gate.set()
        other.stop()


def _quietly(fn) -> None:
    """A request whose answer the test does not read (the gateway may die under it)."""
    try:
        fn()
    except requests.RequestException:
        pass


def _replicas(gw: Gateway) -> list[dict]:
    store = gw.store()
    try:
        return store.replicas()
    finally:
        store.close()


def _open_flows(gw: Gateway, replica: str) -> list[dict]:
    store = gw.store()
    try:
        return store.open_flows(replica, ("response", "error", INTERRUPTED))
    finally:
        store.close()


def _allowed(gw: Gateway, clause: str, value: str) -> bool:
    """A request matching `clause` with an allow decision of the same flow, on record."""
    return bool(gw.events("kind = 'decision' AND effect = 'allow' AND flow IN "
                          f"(SELECT flow FROM events WHERE kind = 'request' AND {clause})", [value]))



# the pure parts: which replicas are gone, which transactions were open, what is written

ROW = {"host": "here", "pid": 1, "state": "running", "age": 1.0}


@pytest.mark.parametrize("row, trusted, why", [
    ({"id": "me"}, True, None),  # this replica
    ({"id": "r1", "state": "reconciled", "pid": 999999999}, True, None),  # done already
    ({"id": "r1", "pid": 999999999}, False, "its process is gone"),  # this host, no such process
    ({"id": "r1", "pid": os.getpid()}, True, None),  # alive on this host
    ({"id": "r1", "state": "stopped"}, False, "it stopped"),
    ({"id": "r1", "host": "there", "age": 30.0}, True, "no heartbeat for 30s"),  # its lease lapsed
    ({"id": "r1", "host": "there", "age": 30.0}, False, None),  # unless this one cannot trust ages yet
    ({"id": "r1", "host": "there", "age": 1.0}, True, None),  # another host, lease current
])
def test_which_replicas_are_gone(row, trusted, why):
    found = gone([{**ROW, **row}], "me", 10.0, "here", trusted)
    assert [w for _, w in found] == ([why] if why else [])


def response(event: str, session: str, xid: str | None, status: str) -> dict:
    tx = {"transaction": {"xid": xid, "status": status}} if xid else {}
    return {"id": event, "session": session, "connection": "db", "detail": json.dumps(tx)}


@pytest.mark.parametrize("responses, open_", [
    ([response("a", "s", "7", "T"), response("b", "s", "7", "T")], [("s", "7", ("a", "b"))]),  # open at the end
    ([response("a", "s", "7", "T"), response("b", "s", None, "I")], []),  # committed or rolled back by the client
    ([response("a", "s", "7", "T"), response("b", "s", "7", "E")], [("s", "7", ("a", "b"))]),  # failed, not ended
    ([response("a", "s", "7", "T"), response("b", "s", None, "I"), response("c", "s", "9", "T")],
     [("s", "9", ("c",))]),  # only the transaction still open
    ([response("a", "s", "7", "T"), response("b", "t", "8", "T")], [("s", "7", ("a",)), ("t", "8", ("b",))]),
])
def test_which_sql_transactions_were_open(responses, open_):
    assert [(t.session, t.xid, t.responses) for t in open_transactions(responses)] == open_


REQUEST = {"id": "req", "session": "s", "flow": "f", "connection": "db", "protocol": "postgres"}


@pytest.mark.parametrize("status, outcome, said, rolled", [
    ("aborted", "not committed", "rolled back", ["a"]),
    ("committed", "committed", "committed", []),
    ("in progress", "in progress", "in progress", []),
    (None, "unknown", "unknown", []),  # too old to know, or the database could not be asked
])
def test_what_is_written_for_an_open_sql_flow(status, outcome, said, rolled):
    tx = Transaction("db", "s", "7", ("a",))
    out = plan("r1", "its process is gone", [REQUEST], [tx], {"7": status} if status else {})
    kinds = [e.kind for e in out.events]
    assert kinds == [INTERRUPTED, *([ROLLED_BACK] if rolled else []), RECONCILED]
    assert (out.events[0].flow, out.events[0].detail["outcome"], out.events[0].detail["transaction"]) == \
        ("f", outcome, {"xid": "7", "status": said})
    assert out.rolled_back == rolled and out.events[-1].detail["interrupted"] == 1


def test_an_open_flow_outside_sql_is_unknown_and_has_no_transaction():
    out = plan("r1", "it stopped", [{**REQUEST, "protocol": "http", "connection": "api"}], [], {})
    assert out.events[0].detail == {"replica": "r1", "why": "it stopped", "request": "req", "outcome": "unknown"}
    assert out.events[1].detail == {"replica": "r1", "why": "it stopped", "interrupted": 1, "rolled_back": [],
                                    "transactions": []}
