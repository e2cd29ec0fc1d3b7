"""A CrewAI crew that reaches the sample stack (scripts/run) only through Custody.

Two agents: an Inventory analyst reads the inventory API and the orders table (PostgreSQL
through pg_bridge); an Operations engineer restocks (a large order the gateway holds for a
manager), tries to drop a table (DDL: denied) and checks the pods with kubectl. With
CREW_MCP_URL, a Help-desk triager searches the ticket desk through CrewAI's own MCP
integration (`mcps=`), whose client reaches the server through the gateway as a proxy.
Every request carries the agent's role, model, crew run, task and tool
(addons/client/crew.py). CREW_TASKS=key,key runs only those tasks.

The model is the deterministic stand-in (examples/samples/standin.py), in process by
default; with CREW_MODEL_URL (e.g. https://models.internal/v1, the sample model server
through the gateway) it is CrewAI's own OpenAI client calling it over HTTPS through the
proxy, with native tool calls, so the gateway sees every completion and proves which one
asked for each request (`custody audit why EVENT`); the crew holds no API key
(CREW_MODEL_STREAM=1 streams the completions). CREW_LLM=provider/model uses a real model.

    scripts/run                                   # in another terminal
    CUSTODY_CONFIG=examples/custody.yaml CUSTODY_SUBJECT=crew-inventory \\
    CUSTODY_GROUPS=analysts,buyers,k8s-readers CUSTODY_CA=.custody/mitmproxy/mitmproxy-ca-cert.pem \\
    CUSTODY_KUBECONFIG=crew.kubeconfig .venv/bin/python examples/crewai/crew.py
    # approve the held order: custody approvals list / approve ID (as a manager)
    # the MCP task: CREW_MCP_URL=http://tickets.mcp.internal/mcp (the sample ticket desk)

It prints the run id (`custody audit replay --run RUN`) and each task's result.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

# CrewAI must not phone home or prompt: set before it is imported.
for name, value in {"CREWAI_DISABLE_TELEMETRY": "true", "OTEL_SDK_DISABLED": "true", "CREWAI_TRACING_ENABLED": "false",
                    "CREWAI_DISABLE_VERSION_CHECK": "true"}.items():
    os.environ.setdefault(name, value)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402
from crewai import LLM, Agent, Crew, Process, Task  # noqa: E402
from crewai.events import CrewKickoffStartedEvent, crewai_event_bus  # noqa: E402
from crewai.tools import BaseTool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from addons.client import Custody  # noqa: E402
from addons.client.crew import instrument  # noqa: E402
from addons.client.crew import model as governed_model  # noqa: E402
from examples.samples.standin import CREW_PLANS, MODEL  # noqa: E402

API = os.environ.get("CREW_API", "http://sample-api.internal")
MCP_URL = os.environ.get("CREW_MCP_URL", "")
MODEL_URL = os.environ.get("CREW_MODEL_URL", "")
PG = (os.environ.get("CREW_PG_HOST", "127.0.0.1"), int(os.environ.get("CREW_PG_PORT", "15432")),
      os.environ.get("CREW_PG_DB", "shop"))
custody = Custody.from_env()


class ApiInput(BaseModel):
    method: str = Field(description="GET or POST")
    path: str = Field(description="path on the inventory API, e.g. /items")
    body: dict | None = Field(default=None, description="JSON body for POST")


class InventoryApi(BaseTool):
    name: str = "inventory_api"
    description: str = "Call the inventory API (items, orders)."
    args_schema: type[BaseModel] = ApiInput

    def _run(self, method: str, path: str, body: dict | None = None) -> str:
        http = custody.session()
        if method.upper() == "POST" and path == "/orders" and isinstance((body or {}).get("item"), int):
            # the tool's own check, which no model asked for: is there such an item?
            if http.get(f"{API}/items/{body['item']}").status_code == 404:
                return f"HTTP 404: no item {body['item']}; nothing was ordered"
        r = http.request(method, API + path, json=body)
        return f"HTTP {r.status_code}: {r.text[:1500]}"


class SqlInput(BaseModel):
    query: str = Field(description="one SQL statement")


class Sql(BaseTool):
    name: str = "sql"
    description: str = "Run one SQL statement on the shop database."
    args_schema: type[BaseModel] = SqlInput

    def _run(self, query: str) -> str:
        try:
            with custody.pg_connect(*PG) as conn:
                cur = conn.execute(query)
                rows = cur.fetchall() if cur.description else []
                return json.dumps({"status": cur.statusmessage, "rows": rows[:50]}, default=str)
        except psycopg.Error as e:
            return f"refused: SQLSTATE {e.sqlstate}: {e}"


class KubectlInput(BaseModel):
    args: str = Field(description="kubectl arguments, e.g. get pods -n shop")


class Kubectl(BaseTool):
    name: str = "kubectl"
    description: str = "Run kubectl against the production cluster."
    args_schema: type[BaseModel] = KubectlInput

    def _run(self, args: str) -> str:
        done = custody.kubectl(*shlex.split(args), kubeconfig=os.environ["CUSTODY_KUBECONFIG"])
        return (done.stdout + done.stderr).strip()[:1500] + f"\n(exit {done.returncode})"


def model(function_calling: bool = True):
    """The crew's model; with CREW_MODEL_URL, `function_calling=False` makes CrewAI use its
    ReAct text format with it (as it does with models that have no function calling)."""
    if os.environ.get("CREW_LLM", "standin") != "standin":
        return LLM(model=os.environ["CREW_LLM"])
    if MODEL_URL:
        return governed_model(custody, MODEL, MODEL_URL, function_calling=function_calling, max_tokens=1024,
                              stream=os.environ.get("CREW_MODEL_STREAM") == "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from standin import StandIn

    return StandIn(model=MODEL, plans=CREW_PLANS)


def key(task: Task) -> str:
    return task.description.split("\n", 1)[0].removeprefix("Task key: ")


def build() -> Crew:
    llm = model()
    analyst = Agent(role="Inventory analyst", goal="Know what is in stock", backstory="Reads, never writes.",
                    tools=[InventoryApi(), Sql()], llm=llm, allow_delegation=False, max_iter=5)
    operator = Agent(role="Operations engineer", goal="Keep the shop stocked and tidy",
                     backstory="Places orders and looks after the cluster.", tools=[InventoryApi(), Sql(), Kubectl()],
                     llm=model(function_calling=False) if MODEL_URL else llm, allow_delegation=False, max_iter=5)
    tasks = [
        Task(name="check stock", description="Task key: stock-check\nRead the inventory and the order totals.",
             expected_output="the stock levels", agent=analyst),
        Task(name="restock", description="Task key: restock\nOrder 500 bolts (item 1).",
             expected_output="the order confirmation", agent=operator),
        Task(name="tidy schema", description="Task key: tidy-schema\nDrop the old orders table, then check the pods.",
             expected_output="what happened", agent=operator),
    ]
    if MCP_URL:
        from crewai.mcp import MCPServerHTTP

        triager = Agent(role="Help-desk triager", goal="Know which tickets are open",
                        backstory="Reads the ticket desk through its MCP server.", mcps=[MCPServerHTTP(url=MCP_URL)],
                        llm=llm, allow_delegation=False, max_iter=5)
        tasks.append(Task(name="triage", description="Task key: triage\nFind the tickets about the VPN.",
                          expected_output="the tickets", agent=triager))
    if wanted := os.environ.get("CREW_TASKS"):
        tasks = [t for t in tasks if key(t) in wanted.split(",")]
    agents = list({id(t.agent): t.agent for t in tasks}.values())
    return Crew(agents=agents, tasks=tasks, process=Process.sequential, verbose=False)


def main() -> int:
    instrument(custody, environment=bool(MCP_URL))  # CrewAI's MCP client finds the gateway in the environment

    @crewai_event_bus.on(CrewKickoffStartedEvent)
    def announce(source, event) -> None:
        print(f"run: {event.event_id}", flush=True)

    crew = build()
    result = crew.kickoff()
    for task in result.tasks_output:
        print(f"task {task.name}: {task.raw}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
