"""planner: what a SQL statement will do on this session, before policy decides on it.

Runs after classify and before policy. Two things need the session's own backend: the
planner's estimate of the rows a write touches (EXPLAIN, never executed, so rules can
hold large writes for review), and what an SQL-level `EXECUTE name` runs (the session
remembers each `PREPARE`). A write whose estimate cannot be made keeps `rows: null`,
which counts against the agent in rules.

Planning runs before policy, so it must not leave anything behind for a statement policy
then denies: EXPLAIN runs only when the estimate could change the decision, and inside a
client's transaction under a savepoint that is rolled back (backend.py), which releases
the locks planning takes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from mitmproxy import http

from addons import context, failclosed
from addons.classifiers import postgres
from addons.engine.model import Operation
from addons.engine.rules import RuleSet
from addons.failclosed import guarded
from pg_bridge.terminal.backend import BackendError, Output
from pg_bridge.terminal.executor import answer
from pg_bridge.terminal.sessions import Session, Sessions

ESTIMABLE = ("INSERT", "UPDATE", "DELETE", "MERGE", "SELECT", "EXECUTE")
"""Commands EXPLAIN can plan; other writes (TRUNCATE, COPY) get no estimate."""
PLANNED_LATER = ("PREPARE",)
"""Runs nothing: estimated when EXECUTE runs it."""


ESTIMATE_CHECKS = ("sql.rows", "risk")
"""What the estimate feeds: rules on the rows a write touches, and on its risk."""


class Rules(Protocol):
    rules: RuleSet | None


class PgPlanner:
    def __init__(self, sessions: Sessions, policy: Rules) -> None:
        self.sessions = sessions
        self.policy = policy

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        op = c.operation
        if op is None or op.protocol != "postgres" or op.details.get("phase") != "execute" or not op.parts:
            return
        session = self.sessions.get(op.details.get("session", ""), c.principal, c.connection)
        extra = {k: op.details[k] for k in ("session", "portal") if k in op.details}
        parts = tuple(postgres.resolved(p, session.prepared.get(p.details.get("name", "")))
                      if p.details.get("command") == "EXECUTE" and session is not None else p for p in op.parts)
        planned = []
        for p in parts:
            if p.action in (postgres.WRITE, postgres.DELETE) and p.details.get("command") not in PLANNED_LATER:
                estimable = session is not None and p.details.get("command") in ESTIMABLE
                rows = await self._rows(f, session, p) if estimable and self._matters(c, p) else None
                if f.response is not None:
                    return  # the session's connection is gone: answered already
                p = postgres.estimated(p, rows)
            planned.append(p)
        c.operation = dataclasses.replace(postgres.combine(op.connection, "execute", tuple(planned), extra),
                                          payload=op.payload)

    def _matters(self, c: context.Context, part: Operation) -> bool:
        """Could the estimate change the decision? Not when a deny rule that does not look
        at it matches, nor when no rule that does could match: then no EXPLAIN runs, so a
        statement policy will deny never reaches the server, not even to be planned."""
        rules = self.policy.rules
        if c.principal is None:
            return False  # policy refuses it
        return rules is None or not rules.settled_without(c.principal, part, ESTIMATE_CHECKS)

    async def _rows(self, f: http.HTTPFlow, session: Session, part: Operation) -> int | None:
        """The planner's estimate (None: it could not plan it). A session whose server went
        away is answered here with 08006, rather than after a review."""
        body = context.of(f).operation.payload
        extended = isinstance(body, dict) and bool(body.get("extended"))
        part_body = body if extended else {}
        try:
            return await session.backend.explain(part.details["sql"], part_body.get("params"),
                                                 part_body.get("param_types"), part_body.get("param_formats"))
        except BackendError as e:
            if session.backend.lost:
                answer(f, self.sessions, session, Output(results=[{"error": e.fields}]))
            return None
