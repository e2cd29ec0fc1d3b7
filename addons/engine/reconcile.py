"""Reconciling the trail after a crash: what a gateway that died left unfinished.

A request and its decision are on record before anything executes; the outcome (response
or error) only after. A replica that dies in between (kill -9, a host lost) leaves flows
that may or may not have run. Once such a replica is known to be gone (its lease lapsed,
it stopped, or it was a process of this host that no longer exists: the same judgement as
for its held approvals, engine/replicas.py `lapsed`), a live replica writes, once:

- an `interrupted` event for each of its open flows (request and decision, no outcome):
  the gateway stopped before it saw what happened; whether a SQL flow ran is looked up;
- a `rolled_back` event in each SQL session whose open transaction the crash rolled back,
  naming the responses recorded inside it (an `INSERT 0 1` that never committed);
- a `reconciled` event for the replica, counting them.

SQL: pg_bridge records on each response of a session inside a transaction that has
written the transaction's id (`detail.transaction`). The session's last response says
whether a transaction was open when the replica died; `pg_xact_status` on the database
then says whether it committed or was rolled back (it is, when the connection dies with
an open transaction, unless the open flow was its COMMIT). Autocommit statements carry no
transaction id before they run: an interrupted one is `unknown`.

Pure functions: the replica addon finds the rows and asks the databases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from addons.engine.model import new_id
from addons.engine.replicas import lapsed, running
from addons.engine.store import Event

INTERRUPTED = "interrupted"
RECONCILED = "reconciled"
ROLLED_BACK = "rolled_back"
OUTCOMES = ("response", "error", INTERRUPTED)
"""Event kinds that close a flow: once one is on record, the flow is not open."""
STATUSES = {"committed": "committed", "aborted": "rolled back", "in progress": "in progress"}
"""pg_xact_status's answers, as the trail says them; None (too old, or unknown): unknown."""


@dataclass(frozen=True)
class Transaction:
    """A SQL session's transaction that was open when its replica died."""

    connection: str
    session: str
    xid: str
    responses: tuple[str, ...]
    """The response events recorded inside it (their statements ran, and may be undone)."""


@dataclass
class Plan:
    """What to write for one replica that is gone."""

    replica: str
    why: str
    events: list[Event] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)


def gone(replicas: list[dict], me: str, lease: float, host: str, trust_age: bool) -> list[tuple[dict, str]]:
    """The replicas (rows of AuditStore.replicas) whose open flows nobody will finish, with
    why: not this one, not reconciled already."""
    out = []
    for row in replicas:
        if row["id"] == me or row["state"] == RECONCILED:
            continue
        if lapsed({**row, "replica": row["id"]}, lease, host, trust_age, starting=True) is None:
            continue
        if row["state"] == "stopped":
            out.append((row, "it stopped"))
        elif row["host"] == host and not running(row["pid"]):
            out.append((row, "its process is gone"))
        else:
            out.append((row, f"no heartbeat for {row['age']:.0f}s"))
    return out


def open_transactions(responses: list[dict]) -> list[Transaction]:
    """From a replica's SQL responses in order (rows with `detail.transaction`, and every
    response of those sessions), the transactions still open at the last response of each
    session: its status was inside a transaction, with an id."""
    last: dict[str, dict] = {}
    inside: dict[tuple[str, str], list[str]] = {}
    for row in responses:
        tx = _transaction(row)
        last[row["session"]] = row
        if tx.get("xid"):
            inside.setdefault((row["session"], tx["xid"]), []).append(row["id"])
    out = []
    for session, row in last.items():
        tx = _transaction(row)
        if tx.get("xid") and tx.get("status") in ("T", "E"):
            out.append(Transaction(row["connection"], session, tx["xid"], tuple(inside[(session, tx["xid"])])))
    return out


def _transaction(row: dict) -> dict[str, Any]:
    detail = row.get("detail") or {}
    return (json.loads(detail) if isinstance(detail, str) else detail).get("transaction") or {}


def plan(replica: str, why: str, open_flows: list[dict], transactions: list[Transaction],
         statuses: dict[str, str | None]) -> Plan:
    """The events that close `open_flows` (request rows) and say what their transactions did;
    `statuses`: pg_xact_status by transaction id (absent: not looked up)."""
    out = Plan(replica, why)
    by_session = {t.session: t for t in transactions}
    for row in open_flows:
        detail = {"replica": replica, "why": why, "request": row["id"], "outcome": "unknown"}
        tx = by_session.get(row["session"])
        if row["protocol"] == "postgres":
            if tx is not None:
                said = STATUSES.get(statuses.get(tx.xid) or "", "unknown")
                detail["transaction"] = {"xid": tx.xid, "status": said}
                detail["outcome"] = "not committed" if said == "rolled back" else said
            else:
                detail["transaction"] = {"xid": None, "status": "unknown"}
        out.events.append(Event(id=new_id(), kind=INTERRUPTED, session=row["session"] or "", flow=row["flow"],
                                connection=row["connection"] or "", detail=detail))
    for tx in transactions:
        if statuses.get(tx.xid) == "aborted":
            out.rolled_back.extend(tx.responses)
            out.events.append(Event(id=new_id(), kind=ROLLED_BACK, session=tx.session, connection=tx.connection,
                                    detail={"replica": replica, "xid": tx.xid, "responses": list(tx.responses)}))
    out.events.append(Event(
        id=new_id(), kind=RECONCILED,
        detail={"replica": replica, "why": why, "interrupted": len(open_flows), "rolled_back": out.rolled_back,
                "transactions": [{"connection": t.connection, "session": t.session, "xid": t.xid,
                                  "status": STATUSES.get(statuses.get(t.xid) or "", "unknown")}
                                 for t in transactions]}))
    return out
