"""planner: what a SQL statement will do on this session, before policy decides on it.

Runs after classify and before policy. Two things need the session's own backend: the
planner's estimate of the rows a write touches (EXPLAIN, never executed, so rules can
hold large writes for review), and what an SQL-level `EXECUTE name` runs (the session
remembers each `PREPARE`). A write whose estimate cannot be made keeps `rows: null`,
which counts against the agent in rules.
"""

from __future__ import annotations

import dataclasses

from mitmproxy import http

from addons import context, failclosed
from addons.classifiers import postgres
from addons.failclosed import guarded
from pg_bridge.terminal.backend import BackendError, Output
from pg_bridge.terminal.executor import answer
from pg_bridge.terminal.sessions import Sessions

ESTIMABLE = ("INSERT", "UPDATE", "DELETE", "MERGE", "SELECT", "EXECUTE")
"""Commands EXPLAIN can plan; other writes (TRUNCATE, COPY) get no estimate."""
PLANNED_LATER = ("PREPARE",)
"""Runs nothing: estimated when EXECUTE runs it."""


class PgPlanner:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        op = c.operation
        if op is None or op.protocol != "postgres" or op.details.get("phase") != "execute" or not op.parts:
            return
        session = self.sessions.get(op.details.get("session", ""), c.principal, c.connection)
        body = op.payload if isinstance(op.payload, dict) else {}
        extended = bool(body.get("extended"))
        parts = []
        for p in op.parts:
            if p.details.get("command") == "EXECUTE" and session is not None:
                p = postgres.resolved(p, session.prepared.get(p.details.get("name", "")))
            if p.action in (postgres.WRITE, postgres.DELETE) and p.details.get("command") not in PLANNED_LATER:
                rows = None
                if session is not None and p.details.get("command") in ESTIMABLE:
                    try:
                        rows = await session.backend.explain(
                            p.details["sql"], body.get("params") if extended else None,
                            body.get("param_types") if extended else None,
                            body.get("param_formats") if extended else None)
                    except BackendError as e:
                        if session.backend.lost:  # nothing can run on it: say so now, not after a review
                            answer(f, self.sessions, session, Output(results=[{"error": e.fields}]))
                            return
                        rows = None
                p = postgres.estimated(p, rows)
            parts.append(p)
        extra = {k: op.details[k] for k in ("session",) if k in op.details}
        c.operation = dataclasses.replace(postgres.combine(op.connection, "execute", tuple(parts), extra),
                                          payload=op.payload)
