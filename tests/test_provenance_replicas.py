"""Provenance across replicas: two real gateways on one real PostgreSQL store, the real
openai SDK calling the example's stand-in model (examples/sample_model.py) through one of
them, and the request its tool call asked for sent through the other.

Replica B has no model output of its own for the principal: it finds A's completion's tool
calls in the store, by the same rules as its own ledger. A request nobody asked for is
`none` on either. When the store's tool calls cannot be read, a request B has nothing for
is refused as of unknown provenance (503 `provenance_unknown`) and never reaches the API,
while A still matches from its own ledger; once the store answers again, B heals. And
`custody run --workers 2` on one port, where the kernel picks the worker of each connection.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from examples.samples.postgres import PostgresServer
from tests import test_llm_gateway
from tests.conftest import standard_identity
from tests.support.gateway import Gateway
from tests.support.servers import Upstream, free_port
from tests.test_llm_gateway import MODEL, agent, ask

model, api = test_llm_gateway.model, test_llm_gateway.api
"""The fixtures: the example's stand-in model with test_llm_gateway's plans, and an API."""

PASSWORD = "store-secret-5b1c"
ORDER = {"item": 2, "quantity": 5}
"""What the stand-in model asks for on the key "small-order" (tests/test_llm_gateway.py PLANS)."""
RULES = {"rules.yaml": {"rules": [
    {"id": "standin", "match": {"connection": "openai", "llm": {"models": "custody-standin/*"}}, "effect": "allow"},
    {"id": "api-read", "match": {"connection": "api", "action": "read"}, "effect": "allow"},
    {"id": "writes-the-model-asked-for", "match": {"connection": "api", "action": "write",
                                                   "provenance": "required"}, "effect": "allow"},
    {"id": "unasked-writes-denied", "match": {"connection": "api", "action": "write", "provenance": "none"},
     "effect": "deny", "reason": "no model output asked for this write"},
]}}


@pytest.fixture(scope="module", autouse=True)
def environment():
    """The store's password, for the gateways and for the tests' own reads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORE_PASSWORD", PASSWORD)
        yield


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer(PASSWORD, log_statements=False)
    server.execute("CREATE DATABASE audit")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, jwks, pg, model, api):
    """Replicas A and B: the same configuration, the same store."""
    connections = [
        {"name": "openai", "kind": "llm", "hosts": ["models.test"], "upstream": model.url,
         "tls": {"ca_file": str(model.ca)}, "credential": {"type": "bearer", "secret": "env:MODEL_KEY"},
         "llm": {"api": "openai"}},
        {"name": "api", "kind": "http", "hosts": ["api.test"], "upstream": f"http://127.0.0.1:{api.port}"},
    ]
    store = {"url": f"postgresql://{pg.superuser}@127.0.0.1:{pg.port}/audit", "password": "env:STORE_PASSWORD"}
    pair = [Gateway(tmp_path_factory.mktemp(f"replica-{name}"), connections=connections, rules=RULES,
                    identity=standard_identity(jwks), store=store,
                    env={"MODEL_KEY": model.key, "STORE_PASSWORD": PASSWORD}).start() for name in "ab"]
    yield pair
    for gw in pair:
        gw.stop()


def recorded(gw: Gateway, kind: str, subject: str, count: int = 1) -> list[dict]:
    """The principal's events of `kind`, once there are `count` of them."""
    deadline = time.monotonic() + 10
    while len(rows := gw.events("kind = ? AND subject = ?", [kind, subject])) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    for r in rows:
        r["operation"] = json.loads(r["operation"]) if r["operation"] else {}
    return rows


def send(gw: Gateway, tok: str, method: str, path: str, body: dict | None = None) -> tuple[requests.Response, str]:
    marker = uuid.uuid4().hex
    r = gw.session(tok).request(method, f"http://api.test{path}", timeout=30, data=json.dumps(body) if body else None,
                                headers={"x-custody-run": "run-1", "content-type": "application/json",
                                         "x-test-marker": marker})
    return r, marker


def reached(server: Upstream, marker: str) -> int:
    return sum(1 for g in server.received if g.headers.get("x-test-marker") == marker)


@pytest.mark.parametrize("key, method, path, body", [
    ("fetch", "GET", "/items", None),
    ("small-order", "POST", "/orders", ORDER),
])
def test_a_request_through_another_replica_carries_the_provenance_of_the_model_call(replicas, token, api, key,
                                                                                    method, path, body):
    a, b = replicas
    subject, tok = agent(token)
    call = ask(a, tok, key)["calls"][0][0]
    completion = recorded(a, "completion", subject)[0]
    r, marker = send(b, tok, method, path, body)
    assert r.status_code == 200 and reached(api, marker) == 1
    decision = recorded(b, "decision", subject, 2)[1]
    found = decision["operation"]["details"]["provenance"]
    assert decision["replica"] != completion["replica"]  # the model call and the request: two replicas
    assert (found["match"], found["event"], found["tool_call"], found["flow"], found["model"]) == (
        "exact", completion["id"], call, completion["flow"], MODEL)


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/items?limit=5", None, 200),  # reads need no model, and record that none asked
    ("POST", "/orders", ORDER, 403),
])
def test_a_request_nobody_asked_for_is_none_on_the_other_replica(replicas, token, api, method, path, body, status):
    a, b = replicas
    subject, tok = agent(token)
    ask(a, tok, "fetch")  # the model asked for GET /items, and for nothing else
    r, marker = send(b, tok, method, path, body)
    assert r.status_code == status and reached(api, marker) == (status == 200)
    if status == 403:
        assert (r.json()["error"], r.json()["rules"]) == ("denied_by_policy", ["unasked-writes-denied"])
    found = recorded(b, "decision", subject, 2)[1]["operation"]["details"]["provenance"]
    assert found["match"] == "none" and "(1 tool calls of this principal and run remembered" in found["reason"]


def test_while_the_stores_tool_calls_cannot_be_read_the_other_replica_refuses_and_heals(replicas, token, api, pg):
    a, b = replicas
    subject, tok = agent(token)
    ask(a, tok, "small-order")
    pg.execute("ALTER TABLE tool_calls RENAME TO tool_calls_away", "audit")
    try:
        r, marker = send(b, tok, "POST", "/orders", ORDER)
        assert (r.status_code, r.json()["error"]) == (503, "provenance_unknown") and reached(api, marker) == 0
        assert "rule writes-the-model-asked-for allows this only when a model asked for it" in r.json()["reason"]
        refused = recorded(b, "decision", subject, 2)[1]
        found = refused["operation"]["details"]["provenance"]
        assert found["match"] == "unknown" and "could not be read (UndefinedTable" in found["reason"]
        r, marker = send(a, tok, "POST", "/orders", ORDER)  # A's own ledger answers: no store read
        assert r.status_code == 200 and reached(api, marker) == 1
    finally:
        pg.execute("ALTER TABLE tool_calls_away RENAME TO tool_calls", "audit")
    r, marker = send(b, tok, "POST", "/orders", ORDER)
    assert r.status_code == 200 and reached(api, marker) == 1
    assert recorded(b, "decision", subject, 4)[3]["operation"]["details"]["provenance"]["match"] == "exact"
    why = b.custody("audit", "why", refused["id"])
    assert why.returncode == 0, why.stderr
    assert "PROMPT      unknown: no model output seen by this replica asked for it" in why.stdout
    assert "PROVENANCE unknown: no model output seen by this replica asked for it" in why.stdout


def test_workers_on_one_port_give_provenance_whichever_worker_each_connection_reaches(tmp_path, jwks, pg, model,
                                                                                     api, token):
    """`custody run --workers 2`: the kernel picks a worker for each new connection, so the
    model call and the request it asked for reach the same worker or not, as it happens;
    each request carries exact provenance either way, and some pairs did cross."""
    pg.execute("CREATE DATABASE audit_workers")
    store = {"url": f"postgresql://{pg.superuser}@127.0.0.1:{pg.port}/audit_workers",
             "password": "env:STORE_PASSWORD"}
    connections = [
        {"name": "openai", "kind": "llm", "hosts": ["models.test"], "upstream": model.url,
         "tls": {"ca_file": str(model.ca)}, "credential": {"type": "bearer", "secret": "env:MODEL_KEY"},
         "llm": {"api": "openai"}},
        {"name": "api", "kind": "http", "hosts": ["api.test"], "upstream": f"http://127.0.0.1:{api.port}"},
    ]
    gw = Gateway(tmp_path, connections=connections, rules=RULES, identity=standard_identity(jwks), store=store,
                 env={"MODEL_KEY": model.key, "STORE_PASSWORD": PASSWORD}, runner="custody", port=free_port(),
                 run_args=("--workers", "2")).start()
    try:
        pairs = []
        for _ in range(12):  # each call and each request on a connection of its own
            subject, tok = agent(token)
            call = ask(gw, tok, "small-order")["calls"][0][0]
            r, marker = send(gw, tok, "POST", "/orders", ORDER)
            assert r.status_code == 200 and reached(api, marker) == 1
            completion = recorded(gw, "completion", subject)[0]
            decision = recorded(gw, "decision", subject, 2)[1]
            found = decision["operation"]["details"]["provenance"]
            assert (found["match"], found["event"], found["tool_call"]) == ("exact", completion["id"], call)
            pairs.append((completion["replica"], decision["replica"]))
        assert len({replica for pair in pairs for replica in pair}) == 2
        assert any(made != asked for made, asked in pairs)
    finally:
        gw.stop()
