"""The example crew with CrewAI's own LLM client (its native OpenAI provider, on the openai
SDK) calling the example's stand-in model served over HTTPS (examples/sample_model.py),
through a real gateway as its proxy, beside the inventory API, PostgreSQL through
pg_bridge and kubectl against the Kubernetes API test server: its own gateway, model
server and backends, on free ports. The analyst asks for tools with function calls, the
operator in CrewAI's ReAct text; completions stream.

Every command the crew runs must carry verified provenance to the completion that asked
for it; the inventory tool's own check (which no model asked for) must record none; a
secret planted in the database reaches the crew but never the model server; and `custody
audit why` must tell the whole chain."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import psycopg
import pytest
import yaml

from examples.sample_cluster import seed
from examples.samples.kubeapi import KubeAPI
from examples.samples.postgres import PostgresServer
from tests.conftest import standard_identity
from tests.support.approvals import Approver, listening, wait_for
from tests.support.gateway import ROOT, Gateway
from tests.support.llm import ModelServer
from tests.support.pgbridge import BridgeProcess
from tests.support.servers import free_port, stop_process, wait_listening

PLANTED = "ghp_" + "Zq4T9vLm2Xw8Rb6Nc1Ys3Kd5Hf7Jg0Pa2Eu4W"  # a GitHub token in a row the crew reads
APP_PASSWORD = "crew-app-password-7c1"
API_TOKEN = "crew-api-token-0d4e"
SA_TOKEN = "crew-cluster-sa-token-2b9"
RULES = {
    "models.yaml": {"rules": [
        {"id": "crew-models", "match": {"connection": "models", "principal": {"groups": ["crew"]},
                                        "llm": {"models": "custody-standin/*", "max_tokens": 1024}},
         "effect": "allow", "masks": ["secrets", "pii"]}]},
    "api.yaml": {"rules": [
        {"id": "items-read", "match": {"connection": "sample-api", "action": "read"}, "effect": "allow"},
        {"id": "orders-the-model-asked-for", "match": {"connection": "sample-api", "method": "POST", "path": "/orders",
                                                       "provenance": "required"}, "effect": "allow"},
        {"id": "large-orders-reviewed", "match": {"connection": "sample-api", "method": "POST", "path": "/orders",
                                                  "body": [{"path": "$.quantity", "op": "gt", "value": 100}]},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "2m"}},
        {"id": "unasked-writes-denied", "match": {"connection": "sample-api", "action": ["write", "delete"],
                                                  "provenance": "none"}, "effect": "deny",
         "reason": "no model output asked for this write"}]},
    "db.yaml": {"rules": [
        {"id": "pg-read", "match": {"connection": "prod-db", "action": "read"}, "effect": "allow",
         "masks": ["secret-keys"]},
        {"id": "pg-ddl-denied", "match": {"connection": "prod-db", "action": "ddl"}, "effect": "deny",
         "reason": "agents do not change the schema"}]},
    "k8s.yaml": {"rules": [
        {"id": "k8s-read", "match": {"connection": "prod-k8s", "action": "read"}, "effect": "allow"}]},
}


@pytest.fixture(scope="module")
def pg():
    server = PostgresServer("crew-admin-pw")
    server.execute("CREATE DATABASE shop")
    server.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    server.execute("ALTER DATABASE shop OWNER TO app")
    with psycopg.connect(server.dsn("shop", "app", APP_PASSWORD), autocommit=True) as c:
        c.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text, quantity int)")
        c.execute("INSERT INTO orders (item, quantity) VALUES ('widget', 3), ('widget', 4), (%s, 1)",
                  (f"gear (supplier key {PLANTED})",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    directory = tmp_path_factory.mktemp("crew-api")
    (directory / "token").write_text(API_TOKEN)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "sample_api.py"), "--port", str(port),
                             "--token-file", str(directory / "token")], stdout=subprocess.DEVNULL, cwd=ROOT)
    wait_listening(port, proc, "the sample API", lambda: "")
    yield port
    stop_process(proc)


@pytest.fixture(scope="module")
def cluster(ca):
    server = KubeAPI(ca.issue("localhost"), SA_TOKEN)
    seed(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    server = ModelServer(tmp_path_factory.mktemp("crew-model"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, jwks, pg, api, cluster, model, ca):
    directory = tmp_path_factory.mktemp("crew-llm-gateway")
    bridge, approvals = free_port(), free_port()
    connections = [
        {"name": "models", "kind": "llm", "hosts": ["models.internal"], "upstream": model.url,
         "tls": {"ca_file": str(model.ca)}, "credential": {"type": "bearer", "secret": "env:MODEL_KEY"},
         "llm": {"api": "openai"}},
        {"name": "sample-api", "kind": "http", "hosts": ["sample-api.internal"], "upstream": f"http://127.0.0.1:{api}",
         "credential": {"type": "bearer", "secret": "env:API_TOKEN"}},
        {"name": "prod-db", "kind": "postgres", "hosts": ["db.prod.internal"],
         "upstream": f"postgresql://127.0.0.1:{pg.port}/shop", "listen": f"127.0.0.1:{bridge}",
         "credential": {"type": "password", "username": "app", "secret": "env:PG_APP_PASSWORD"}},
        {"name": "prod-k8s", "kind": "kubernetes", "hosts": ["kube.prod.internal"], "upstream": cluster.url,
         "tls": {"ca_file": str(ca.cert_file)}, "credential": {"type": "bearer", "secret": "env:SA_TOKEN"}},
    ]
    g = Gateway(directory, connections=connections, rules=RULES, identity=standard_identity(jwks),
                env={"MODEL_KEY": model.key, "API_TOKEN": API_TOKEN, "PG_APP_PASSWORD": APP_PASSWORD,
                     "SA_TOKEN": SA_TOKEN})
    g.config["approvals"] = {"listen": f"127.0.0.1:{approvals}", "sweep": "200ms"}
    g.config_file.write_text(yaml.safe_dump(g.config))
    g.approvals_url, g.bridge_port = f"http://127.0.0.1:{approvals}", bridge
    g.start()
    wait_for(lambda: listening(g.approvals_url))
    pg_bridge = BridgeProcess(g, bridge, directory / "pg-bridge.log")
    yield g
    pg_bridge.stop()
    g.stop()


@pytest.fixture(scope="module")
def crew(gw, keys, jwks, tmp_path_factory):
    """One run of examples/crewai/crew.py, its large order approved by a manager."""
    home = tmp_path_factory.mktemp("crew-home")
    crew_token = keys["rsa"].token(jwks.issuer, sub="crew-inventory", groups=["crew"], ttl=1800)
    (home / "crew.jwt").write_text(crew_token)
    gw.custody("kubeconfig", "--connection", "prod-k8s", "--token-file", str(home / "crew.jwt"), "--ca", str(gw.ca),
               "--proxy-url", gw.proxy_url(None), "-o", str(home / "kubeconfig"), check=True)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith(("OPENAI", "KUBE"))}
    env.update(HOME=str(home), CREWAI_STORAGE_DIR=str(home / "crewai"), PYTHONPATH=str(ROOT),
               CUSTODY_TOKEN=crew_token, CUSTODY_PROXY_URL=f"http://127.0.0.1:{gw.port}", CUSTODY_CA=str(gw.ca),
               CUSTODY_KUBECONFIG=str(home / "kubeconfig"), CREW_PG_PORT=str(gw.bridge_port),
               CREW_MODEL_URL="https://models.internal/v1", CREW_MODEL_STREAM="1",
               CREW_TASKS="stock-check,restock,tidy-schema")
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "crewai" / "crew.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=home)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    manager = Approver(gw.approvals_url, keys["rsa"].token(jwks.issuer, sub="manager-1", groups=["managers"]))
    def held_order():
        assert proc.poll() is None, "".join(output)  # the crew ended before its order was held
        return next((a for a in manager.list() if a["requester"]["subject"] == "crew-inventory"), None)

    try:
        held = wait_for(held_order, timeout=240)
        assert manager.vote(held["id"], "approve", "stock is low").status_code == 200
        proc.wait(timeout=300)
    finally:
        proc.kill()
    reader.join(10)
    text = "".join(output)
    assert proc.returncode == 0, text
    return {"output": text, "run": re.search(r"^run: (\S+)$", text, re.M).group(1), "held": held}


def run_events(gw: Gateway, run: str, where: str, args: list | None = None) -> list[dict]:
    rows = gw.events(f"({where}) AND (json_extract(principal, '$.asserted.run') = ?)", [*(args or []), run])
    for r in rows:
        for column in ("operation", "detail", "principal"):
            r[column] = json.loads(r[column]) if r[column] else {}
    return rows


def test_the_crew_runs_with_its_model_called_through_the_gateway(crew, gw, model):
    out = crew["output"]
    assert 'task restock: HTTP 201: {"order_id"' in out
    assert "task tidy schema: NAME" in out and "web-1" in out  # kubectl ran after the refused DROP
    calls = [r for r in model.received() if r["path"] == "/v1/chat/completions"]
    assert calls and all(r["headers"]["authorization"] == f"Bearer {model.key}" for r in calls)  # the gateway's key
    completions = run_events(gw, crew["run"], "kind = 'completion'")
    assert len(completions) == len(calls)
    assert {c["detail"]["streamed"] for c in completions} == {True} and all(c["detail"]["complete"] for c in completions)
    assert all(c["detail"]["usage"]["output_tokens"] > 0 for c in completions)
    agents = {c["principal"]["asserted"]["agent"] for c in completions}
    assert agents == {"Inventory analyst", "Operations engineer"}  # the model calls say who made them


def test_every_command_the_crew_runs_carries_provenance_to_the_completion_that_asked_for_it(crew, gw):
    commands = [r for r in run_events(gw, crew["run"], "kind = 'request' AND protocol IN ('http', 'postgres', "
                                                       "'kubernetes')")
                if r["operation"]["details"]["provenance"]["match"] != "n/a"]
    completions = {c["id"]: c for c in run_events(gw, crew["run"], "kind = 'completion'")}
    own = [r for r in commands if r["operation"]["details"].get("path") == "/items/1"]
    asked = [r for r in commands if r not in own]
    assert {r["protocol"] for r in asked} == {"http", "postgres", "kubernetes"}
    assert len(own) == 1 and own[0]["operation"]["details"]["provenance"]["match"] == "none"
    forms = set()
    for r in asked:
        found = r["operation"]["details"]["provenance"]
        assert found["match"] in ("exact", "normalised"), (r["operation"]["summary"], found)
        completion = completions[found["event"]]
        calls = {c["id"] or f"{completion['id']}#{n}": c for n, c in enumerate(completion["detail"]["tool_calls"])}
        assert calls[found["tool_call"]]["arguments"] == found["arguments"]
        assert completion["ts"] <= r["ts"]
        if r["protocol"] == "postgres":
            assert found["arguments"]["query"] == r["operation"]["details"]["sql"]
        forms.add(found["form"])
    assert forms == {"function", "react"}  # the analyst calls functions, the operator writes ReAct text
    kube = [r for r in asked if r["protocol"] == "kubernetes"]
    assert kube and {r["operation"]["details"]["provenance"]["arguments"]["args"] for r in kube} == {"get pods -n shop"}


def test_a_planted_secret_reaches_the_crew_but_never_the_model_server(crew, gw, model):
    received = json.dumps(model.received())
    assert PLANTED not in received and "[GITHUB_TOKEN]" in received  # the tool result went, masked
    sql = run_events(gw, crew["run"], "kind = 'response' AND protocol = 'postgres'")
    assert any(PLANTED.encode() in (r["body"] or b"") for r in sql)  # the agent's own read was not masked


def test_audit_why_shows_the_whole_chain_of_the_approved_order(crew, gw):
    order = run_events(gw, crew["run"], "kind = 'decision' AND protocol = 'http' AND "
                                        "json_extract(operation, '$.details.method') = 'POST'")
    assert len(order) == 1
    why = gw.custody("audit", "why", str(order[0]["seq"]))
    assert why.returncode == 0, why.stderr
    text = why.stdout
    steps = [text.index(label) for label in ("PROMPT", "COMPLETION", "COMMAND", "DECISION", "APPROVAL", "RESPONSE")]
    assert steps == sorted(steps), text
    assert "MODEL CALL custody-standin/scripted-1 (chat)" in text and "Task key: restock" in text
    assert "TOOL CALL (react) inventory_api" in text  # the operator writes ReAct text
    assert re.search(r"PROVENANCE exact: tool call \w+#0 \(inventory_api\) of completion \w+ by "
                     r"custody-standin/scripted-1", text)
    assert "approved by manager-1 (approved" in text and "RESPONSE    #" in text and " 201" in text
    assert crew["held"]["provenance"]["match"] == "exact"  # what the approver was shown
    assert crew["held"]["provenance"]["tool"] == "inventory_api"


def test_the_replay_of_the_run_interleaves_the_conversation_with_the_commands(crew, gw):
    replay = gw.custody("audit", "replay", "--run", crew["run"])
    assert replay.returncode == 0, replay.stderr
    lines = replay.stdout.splitlines()
    drop = next(n for n, line in enumerate(lines) if "[postgres] DROP TABLE" in line)
    completion = max(n for n, line in enumerate(lines[:drop]) if " COMPLETION " in line)
    assert any("Action: sql" in line for line in lines[completion:drop])
    assert any("PROVENANCE exact" in line for line in lines) and any("PROVENANCE none" in line for line in lines)
