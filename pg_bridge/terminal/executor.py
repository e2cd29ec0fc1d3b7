"""executor: the terminal for postgres connections. It answers cleared pg_bridge requests
itself, on the real server, with the database login only the gateway holds.

It sets `flow.response` in the request hook, so nothing goes upstream as HTTP and the
response hooks (masking, then the recorder) still run on the result. The response is
SQL_RESULTS JSON: every statement's columns (name, type OID, where they come from and what
they are computed from when column masks apply: columns.py), rows as the server encoded
them, command tag or the server's own error fields; notices; the transaction state and
the parameters that changed. A server error is a result, not a gateway error; the
gateway's own failures (no such session, database unreachable) are results too, with
their SQLSTATE, so the client sees a PostgreSQL error either way.

Rows are fetched as text when masks apply or the client's formats differ by column; after
masking and the record, this addon's response hook encodes the columns the client asked
for in binary (formats.py), so the record holds readable text and the client its formats.
"""

from __future__ import annotations

import asyncio
import json
import logging

from mitmproxy import http

from addons import context, failclosed
from addons.engine.bridge import SQL_RESULTS
from addons.engine.config import Connection
from addons.engine.masks import parse_all as parse_masks
from addons.failclosed import guarded
from addons.settings import Settings
from pg_bridge.terminal import formats
from pg_bridge.terminal.backend import Backend, BackendError, Output, conninfo, failure
from pg_bridge.terminal.columns import UNREAD, Columns
from pg_bridge.terminal.sessions import Session, Sessions

logger = logging.getLogger(__name__)
ENCODE = "custody.pg.encode"
"""flow.metadata: columns of this answer still need the format the client asked for."""


def unsupported(parts: list[dict]) -> dict | None:
    """ErrorResponse fields for statements the gateway cannot carry faithfully, whatever
    the rules say: COPY to or from the client; changes of the settings that decide how the
    server reads SQL text or whether writes may run (addons/classifiers/postgres/settings.py),
    in any spelling; LISTEN, whose notifications arrive while a session is idle, when the
    bridge has no request to answer with them."""
    for p in parts:
        if p.get("copy") and not p.get("server_side"):
            return failure("0A000", "COPY FROM STDIN / TO STDOUT is not supported through the gateway",
                           H="Use INSERT … VALUES to load rows and SELECT to read them.")
        if p.get("protected"):
            return failure("0A000", f"{p['protected'][0]} cannot be changed through the gateway")
        if p.get("command") == "LISTEN":
            return failure("0A000", "LISTEN is not supported through the gateway: notifications cannot be "
                                    "delivered to a session while it waits", H="Poll a table instead.")
    return None


def prepared_guard(session: Session, parts: list[dict]):
    """For EXECUTE: refuse when a prepared statement was replaced after the decision (the
    decision was on what it was then)."""
    expected = {p["name"]: p.get("prepared_sql") for p in parts if p.get("command") == "EXECUTE"}

    def guard() -> dict | None:
        for name, sql in expected.items():
            now = session.prepared.get(name)
            if sql is not None and (now is None or now["sql"] != sql):
                return failure("42501", f"custody: prepared statement {name!r} changed after it was decided; "
                                        "send the EXECUTE again")
        return None

    return guard


def portal_step(session: Session, body: dict, parts: list[dict]) -> tuple[str, list | None, list | None] | Output:
    """What runs a step: the statement itself; or, for a named portal the bridge keeps on
    the backend (so SQL can MOVE and FETCH in it, and it lives until its transaction ends),
    DECLARE when it is bound and FETCH when it is executed. A statement that cannot be a
    cursor (it writes) is left to the bridge to run when executed (`deferred`)."""
    if body.get("declare"):
        if len(parts) != 1 or parts[0].get("command") != "SELECT" or {"WRITE", "DDL"} & set(parts[0]["classes"]):
            return Output(results=[{"deferred": True}], status=session.backend.status)
        return (f"DECLARE {ident(body['declare'])} NO SCROLL CURSOR FOR {body['sql']}", body.get("params"),
                body.get("param_types"))
    if body.get("fetch"):
        if session.cursors.get(body["fetch"]) != body["sql"]:  # what was decided must be what it reads
            return Output(results=[{"error": failure("34000", f'portal "{body["fetch"]}" does not exist')}],
                          status=session.backend.status)
        rows = int(body.get("max_rows") or 0)
        return f"FETCH {f'FORWARD {rows}' if rows > 0 else 'ALL'} FROM {ident(body['fetch'])}", None, None
    return body["sql"], body.get("params"), body.get("param_types")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def answer(f: http.HTTPFlow, sessions: Sessions, session: Session | None, out: Output) -> None:
    """The flow's response: `out` as SQL_RESULTS. A session whose server went away is
    closed here, and the answer says so (the bridge then ends the client's connection)."""
    if session is not None and session.backend.lost:
        sessions.close(session.id)
        out.closed = True
    f.response = http.Response.make(200, json.dumps(out.as_dict(), ensure_ascii=False),
                                    {"content-type": SQL_RESULTS})


class PgExecutor:
    def __init__(self, settings: Settings, sessions: Sessions) -> None:
        self.settings = settings
        self.sessions = sessions
        self.columns = Columns()

    def done(self) -> None:
        self.columns.close()

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "postgres" or not c.cleared:
            return  # not ours, or the gate refuses it
        conn = self.settings.registry.by_name[c.connection]
        op = c.operation
        body = op.payload
        phase = op.details["phase"]
        session_id = op.details["session"]
        session = None
        try:
            if phase == "connect":
                out = await self._connect(conn, session_id, c, body)
            else:
                session = self.sessions.get(session_id, c.principal, conn.name)
                if session is None:
                    raise BackendError(failure("08003", "no such session on the gateway (it was closed, or it is "
                                                        "not yours); reconnect"))
                out = await self._step(conn, session, c)
        except BackendError as e:
            out = Output(results=[{"error": e.fields}])
        if any("send" in col for r in out.results for col in r.get("columns", ())):
            f.metadata[ENCODE] = True
        answer(f, self.sessions, session, out)

    async def _connect(self, conn: Connection, session_id: str, c: context.Context, body: dict) -> Output:
        if self.sessions.taken(session_id, c.principal):
            raise BackendError(failure("08P01", "that session id belongs to another principal"))
        settings = {k: str(v) for k, v in (body.get("parameters") or {}).items()}
        info = conninfo(conn.upstream.host, conn.upstream.port, conn.upstream.database, conn.credential.header,
                        conn.credential.value, conn.ca_file, settings)
        backend = await Backend.connect(info)
        self.sessions.add(Session(session_id, self.sessions.owner(c.principal), conn.name, backend))
        return Output(status=backend.status, parameters=backend.parameters)

    async def _step(self, conn: Connection, session: Session, c: context.Context) -> Output:
        op, body = c.operation, c.operation.payload
        phase = op.details["phase"]
        if phase == "close":
            self.sessions.close(session.id)
            return Output()
        if phase == "cancel":
            cancelled = await asyncio.to_thread(session.backend.cancel)
            return Output(results=[{"command": "CANCEL" if cancelled else "IDLE"}], status=session.backend.status)
        masks = parse_masks(c.decision.masks)
        structural = any(m.kind != "detect" for m in masks)
        wanted = [int(f) for f in body.get("result_formats") or ()]
        if phase == "describe":
            if "portal" in body:
                out = await session.backend.describe_portal(body["portal"])
                statements = [session.cursors.get(body["portal"], UNREAD)]
            else:
                out = await session.backend.describe(body["sql"], body.get("param_types"))
                statements = [op.parts[0].details["sql"] if op.parts else UNREAD]
            await self.columns.describe(conn, out, statements, structural)
            return self._formats(out, wanted, described=True)
        parts = [p.details for p in op.parts]
        if problem := unsupported(parts):
            return Output(results=[{"error": problem}], status=session.backend.status)
        run = portal_step(session, body, parts)
        if isinstance(run, Output):
            return run
        sql, params, types = run
        out = await session.backend.execute(
            sql, extended=bool(body.get("extended")), params=params, types=types,
            formats=body.get("param_formats") if params else None,
            result_format=formats.fetched(wanted or [0], bool(masks)), max_bytes=conn.max_result_bytes,
            guard=prepared_guard(session, parts))
        if body.get("declare") or body.get("fetch"):
            statements = [body["sql"]]  # a portal's rows are its statement's
        else:
            statements = [session.statement(p) or UNREAD for p in parts]  # a cursor's, before CLOSE forgets it
        session.remember(parts, out.results)
        await self._transaction(session, c, out)
        if body.get("declare") and not any("error" in r for r in out.results):
            session.cursors[body["declare"]] = body["sql"]
        await self.columns.describe(conn, out, statements, structural)
        return self._formats(out, wanted)

    @staticmethod
    async def _transaction(session: Session, c: context.Context, out: Output) -> None:
        """Keep the id of the session's transaction once a write gave it one, and record it
        with every response inside it (addons/engine/reconcile.py)."""
        if out.status == "I" or out.closed:
            session.xid = None
        elif session.xid is None and out.status == "T" and c.operation.action != "read":
            try:
                session.xid = await session.backend.xid()
            except BackendError:
                session.xid = None
        c.transaction = {"xid": session.xid, "status": out.status} if session.xid else None

    @staticmethod
    def _formats(out: Output, wanted: list[int], described: bool = False) -> Output:
        """Each column says the format the client asked for it in (`send`), where that is
        not the one it was fetched in; a description says what an execution will send."""
        for result in out.results:
            columns = result.get("columns")
            if columns is None:
                continue  # no rows: Bind's formats do not apply (PortalSetResultFormat)
            try:
                per_column = formats.per_column(wanted, len(columns))
            except formats.FormatError as e:
                result.clear()
                result["error"] = e.fields
                continue
            for column, fmt in zip(columns, per_column):
                if described:
                    column["format"] = fmt
                elif fmt != column["format"]:
                    column["send"] = fmt
        return out

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        """After masking and the record: columns the client wants in binary, fetched as
        text, are encoded (pg_bridge/terminal/formats.py)."""
        c = context.of(f)
        if not f.metadata.get(ENCODE) or f.response is None or f.response.status_code != 200 \
                or not f.response.headers.get("content-type", "").startswith(SQL_RESULTS):
            return  # nothing to encode, or refused after the terminal answered
        doc = json.loads(f.response.content)
        session = self.sessions.get(c.operation.details.get("session", ""), c.principal, c.connection)
        try:
            if session is None:
                raise BackendError(failure("08003", "no such session on the gateway; reconnect"))
            await formats.encode(doc, session.backend.binary)
        except BackendError as e:
            doc["results"] = [{"error": e.fields}]
        f.response.content = json.dumps(doc, ensure_ascii=False).encode()
