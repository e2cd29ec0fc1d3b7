"""pg_bridge: a PostgreSQL server for unmodified clients, whose every step is an HTTP
request through the gateway.

A client logs in with its OIDC JWT as the password; the bridge asks the gateway to open a
session (`POST /connect` to the connection's host, the token as Proxy-Authorization), and
only then says AuthenticationOk. Each simple query, and each Execute of the extended
protocol, is one `POST /execute`; statement descriptions are `POST /describe`; cancel and
close are requests too. The gateway identifies, classifies, decides, holds for approval,
records, runs (pg_bridge/terminal/executor.py) and masks; the bridge turns the answer back into
protocol messages: rows, command tags, the server's own errors, transaction state.

Prepared statements and portals of the extended protocol live here; the gateway sees each
execution with its SQL and parameters, so every execution is decided on what it runs.
Execute with a row limit gets the rows in pieces with PortalSuspended, from one
execution. Several Executes before one Sync run in one transaction, as on a real server.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from addons.engine.bridge import POSTGRES, Link, LinkLost, Refusal, Unreachable, attributes_from, step
from addons.engine.config import Connection
from addons.engine.errors import GATEWAY_FAILURES
from pg_bridge.server import protocol as pgp
from pg_bridge.server.protocol import Bind, Describe, ProtocolError

logger = logging.getLogger(__name__)
SERVER_ENCODING = {"client_encoding": "UTF8", "server_encoding": "UTF8"}
class Failed(Exception):
    """A step failed; `fields` is the ErrorResponse to send."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = fields


class Ended(Exception):
    """The session's database connection is gone: the client gets the FATAL error and the
    connection ends, as it would with a server that went away (drivers and pools then
    reconnect instead of reusing a dead session). Not a Failed: nothing may go on."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = fields


def refusal_fields(refusal: Refusal) -> dict[str, str]:
    """A gateway refusal as PostgreSQL error fields: identity failures are 28000, policy and
    approval denials 42501, the gateway's own failures 58000 (08006 without a reason); the
    detail names the rules, the approval and the audit event, the hint what to do about it."""
    if refusal.body is None:
        code = "08006"
    else:
        code = "28000" if refusal.identity else "58000" if str(refusal.body.get("error")) in GATEWAY_FAILURES else "42501"
    fields = {"S": "ERROR", "V": "ERROR", "C": code, "M": refusal.reason}
    if refusal.detail:
        fields["D"] = refusal.detail
    if refusal.body is not None and isinstance(refusal.body.get("hint"), str):
        fields["H"] = refusal.body["hint"]
    return fields


def split_options(options: str) -> tuple[str, dict[str, str]]:
    """The startup `options` without its `-c custody.NAME=VALUE` settings, and those as
    agent attributes (psycopg: options='-c custody.task=restock'); the rest goes to the
    server. Words split on whitespace, a backslash escapes the next character (as the
    server reads them)."""
    words, word, escaped = [], None, False
    for ch in options:
        if escaped:
            word, escaped = (word or "") + ch, False
        elif ch == "\\":
            word, escaped = word or "", True
        elif ch.isspace():
            if word is not None:
                words.append(word)
            word = None
        else:
            word = (word or "") + ch
    if word is not None:
        words.append(word)
    kept, settings, i = [], {}, 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting, step = words[i + 1], 2
        elif word.startswith("--") or (word.startswith("-c") and len(word) > 2):
            setting, step = word[2:], 1
        else:
            setting, step = "", 1
        name, eq, value = setting.partition("=")
        if eq and name.lower().startswith("custody."):
            settings[name] = value
        else:
            kept += words[i:i + step]
        i += step
    return " ".join(w.replace("\\", "\\\\").replace(" ", "\\ ") for w in kept), attributes_from(settings, "custody.")


class Gateway:
    """Sends the bridge's requests through the gateway (an HTTP proxy) to a connection's host."""

    def __init__(self, proxy: str, host: str) -> None:
        parts = urlsplit(proxy)
        self.proxy = (parts.hostname or "127.0.0.1", parts.port or 8080)
        self.host = host

    def link(self) -> Link:
        return Link(*self.proxy)

    async def call(self, link: Link, phase: str, token: str, session: str, body: dict) -> dict[str, Any]:
        """The gateway's SQL results for one step; Failed with error fields otherwise."""
        try:
            return await step(link, POSTGRES, self.host, phase, token, session, body)
        except LinkLost:
            raise  # the session is over (Client.run)
        except Unreachable as e:
            raise Failed({"S": "ERROR", "V": "ERROR", "C": "08006", "M": str(e)}) from None
        except Refusal as e:
            raise Failed(refusal_fields(e)) from None


@dataclass
class Portal:
    """A bound statement. Inside a transaction block a named portal of a query lives on the
    backend as a cursor (`declared`): rows are fetched as Executes ask for them, and SQL can
    MOVE and FETCH in it (asyncpg's Cursor.forward); else the bridge runs it at its first
    Execute and hands out the rows as later Executes ask."""

    name: str
    sql: str
    types: list[int]
    params: list[Any]
    param_formats: list[int]
    result_formats: list[int]
    declared: bool = False
    columns: list[dict] | None = None
    rows: list[list] | None = None
    command: str = ""
    done: bool = False


@dataclass
class Session:
    """One client connection's state: its token, its statements and portals."""

    id: str
    token: str
    pid: int
    secret: int
    status: str = "I"
    statements: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    portals: dict[str, Portal] = field(default_factory=dict)
    link: Link | None = None
    inflight: asyncio.Task | None = None
    cancelled: bool = False


class Client:
    """Speaks the protocol with one client."""

    def __init__(self, bridge: Bridge, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.bridge, self.reader, self.writer = bridge, reader, writer
        self.conn = bridge.connection
        self.out = bytearray()
        self.session: Session | None = None
        self.discarding = False

    # framing

    async def _startup(self) -> pgp.Startup:
        (length,) = struct.unpack("!I", await self.reader.readexactly(4))
        if not 8 <= length <= 10000:
            raise ProtocolError("invalid startup packet length")
        return pgp.parse_startup(await self.reader.readexactly(length - 4))

    async def _message(self) -> tuple[str, bytes]:
        head = await self.reader.readexactly(5)
        kind, length = chr(head[0]), struct.unpack("!I", head[1:])[0]
        if not 4 <= length <= pgp.MAX_MESSAGE:
            raise ProtocolError("invalid message length")
        return kind, await self.reader.readexactly(length - 4)

    async def _flush(self) -> None:
        if self.out:
            self.writer.write(bytes(self.out))
            self.out.clear()
        await self.writer.drain()

    def _error(self, fields: dict[str, str]) -> None:
        self.out += pgp.error(fields)

    async def _fatal(self, code: str, message: str, detail: str = "", hint: str = "") -> None:
        fields = {"S": "FATAL", "V": "FATAL", "C": code, "M": message, **({"D": detail} if detail else {}),
                  **({"H": hint} if hint else {})}
        self.out += pgp.error(fields)
        await self._flush()

    # session

    async def run(self) -> None:
        try:
            if await self._login():
                await self._serve()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session is closed below
        except LinkLost as e:  # its gateway is gone: the session cannot go on elsewhere
            await self._fatal("08006", str(e))
        except ProtocolError as e:
            await self._fatal("08P01", f"protocol violation: {e}")
        except Ended as e:
            self.out.clear()  # nothing after the FATAL error: no ReadyForQuery
            await self._fatal(e.fields.get("C", "08006"), e.fields.get("M", ""), e.fields.get("D", ""), e.fields.get("H", ""))
        finally:
            if self.session is not None:
                self.bridge.sessions.pop((self.session.pid, self.session.secret), None)
                self.bridge.closing(self.session)
            self.writer.close()

    async def _login(self) -> bool:
        """The startup, SSL negotiation and password within `limits.authenticate` (a client
        still short of its password then is disconnected without a word, as PostgreSQL does
        when its authentication_timeout passes); then the gateway opens the session."""
        try:
            async with asyncio.timeout(self.bridge.limits.authenticate):
                hello = await self._hello()
        except TimeoutError:
            logger.info("pg_bridge: %s: no login within %gs; disconnected", self.conn.name,
                        self.bridge.limits.authenticate)
            return False
        if isinstance(hello, pgp.Startup):
            await self.bridge.cancel(*hello.cancel)
            return False
        if hello is None:
            return False
        params, database, token = hello
        session = Session(id=secrets.token_hex(16), token=token, pid=secrets.randbits(31), secret=secrets.randbits(32),
                          link=self.bridge.gateway.link())
        options, attributes = split_options(params.get("options", ""))
        session.link.attributes = attributes
        params = {**params, "options": options} if options else {k: v for k, v in params.items() if k != "options"}
        try:
            answer = await self.bridge.gateway.call(session.link, "connect", token, session.id, {
                "database": database, "user": params.get("user", ""), "parameters": {
                    k: v for k, v in params.items() if k not in ("user", "database", "client_encoding")}})
            errors = [r["error"] for r in answer.get("results", []) if "error" in r]
            if errors:
                raise Failed(errors[0])
        except Failed as e:
            session.link.close()
            code = "28P01" if e.fields.get("C") == "28000" else e.fields.get("C", "28000")
            await self._fatal(code, e.fields.get("M", "login refused"), e.fields.get("D", ""), e.fields.get("H", ""))
            return False
        self.session = session
        self.bridge.sessions[(session.pid, session.secret)] = session
        self.out += pgp.auth_request(0)
        for name, value in {**answer.get("parameters", {}), **SERVER_ENCODING}.items():
            self.out += pgp.parameter_status(name, value)
        self.out += pgp.backend_key(session.pid, session.secret)
        session.status = answer.get("status", "I")
        self.out += pgp.ready(session.status)
        await self._flush()
        return True

    async def _hello(self) -> tuple[dict[str, str], str, str] | pgp.Startup | None:
        """Up to the password: the startup parameters, the database and the token; or a
        CancelRequest's startup; or None when the client was told no."""
        startup = await self._startup()
        while startup.code in (pgp.SSL_REQUEST, pgp.GSSENC_REQUEST):
            if startup.code == pgp.SSL_REQUEST and self.bridge.tls is not None:
                self.writer.write(pgp.SSL_YES)
                await self.writer.drain()
                await self.writer.start_tls(self.bridge.tls)
            else:
                self.writer.write(pgp.SSL_NO)  # GSSAPI encryption is never offered
                await self.writer.drain()
            startup = await self._startup()
        if startup.cancel is not None:
            return startup
        params = startup.parameters
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if startup.minor != 0 or unsupported:
            self.out += pgp.negotiate_version(0, unsupported)
        database = params.get("database") or params.get("user", "")
        if database != self.conn.upstream.database:
            await self._fatal("3D000", f'database "{database}" does not exist',
                              f"this pg_bridge serves the database {self.conn.upstream.database!r} of connection "
                              f"{self.conn.name}")
            return None
        self.out += pgp.auth_request(3)  # cleartext password: the agent's JWT
        await self._flush()
        kind, body = await self._message()
        if kind != "p":
            raise ProtocolError("expected a password message")
        return params, database, pgp.decode("p", body).strip()

    async def _call(self, phase: str, body: dict) -> dict[str, Any]:
        """One step through the gateway; a cancel request while it waits ends it with 57014."""
        s = self.session
        s.cancelled = False
        s.inflight = asyncio.ensure_future(self.bridge.gateway.call(s.link, phase, s.token, s.id, body))
        try:
            answer = await s.inflight
        except asyncio.CancelledError:
            if not s.cancelled:
                raise
            raise Failed({"S": "ERROR", "V": "ERROR", "C": "57014", "M": "canceling statement due to user request"})
        finally:
            s.inflight = None
        if s.status in "TE" and answer.get("status") == "I":
            s.portals.clear()  # the transaction ended, and its portals with it
        if answer.get("closed"):
            errors = [r["error"] for r in answer.get("results", []) if "error" in r]
            raise Ended(errors[-1] if errors else {"C": "08006", "M": "the gateway's database connection was lost"})
        s.status = answer.get("status", s.status)
        for notice in answer.get("notices", []):
            self.out += pgp.error(notice, b"N")
        for name, value in answer.get("parameters", {}).items():
            if name not in SERVER_ENCODING:
                self.out += pgp.parameter_status(name, value)
        return answer

    async def _next(self) -> tuple[str, Any] | None:
        """The client's next message, or None when it sent none for `limits.idle`: the
        connection then ends with the FATAL error PostgreSQL's own idle timeouts send. Only
        read between statements, so a statement that runs or is held is never idle."""
        try:
            async with asyncio.timeout(self.bridge.limits.idle):
                return await self._message()
        except TimeoutError:
            code, kind = ("25P03", "idle-in-transaction") if self.session.status in "TE" else ("57P05", "idle-session")
            await self._fatal(code, f"terminating connection due to {kind} timeout",
                              f"custody: no message for {self.bridge.limits.idle:g}s (limits.idle of connection "
                              f"{self.conn.name})")
            return None

    async def _serve(self) -> None:
        batch: list[tuple[str, Any]] = []
        while (message := await self._next()) is not None:
            kind, body = message
            if kind == "X":
                return
            if kind == "Q":
                await self._simple(pgp.decode("Q", body))
            elif kind in "PBDEC":
                if not self.discarding:
                    batch.append((kind, pgp.decode(kind, body)))
            elif kind == "H" and self.discarding:
                continue  # after an error, everything up to Sync is ignored, Flush too
            elif kind == "S" and self.discarding:
                self.discarding = False
                self.out += pgp.ready(self.session.status)
            elif kind in "SH":
                await self._extended(batch, sync=kind == "S")
                batch = []
            elif kind == "F":
                self._error({"S": "ERROR", "V": "ERROR", "C": "0A000",
                             "M": "the function call protocol is not supported through the gateway; use SELECT"})
                self.out += pgp.ready(self.session.status)
            elif kind in "dcf":
                continue  # COPY data after a refused COPY: ignored, as a server does
            else:
                raise ProtocolError(f"unexpected message type {kind!r}")
            await self._flush()

    # simple query

    async def _simple(self, sql: str) -> None:
        try:
            answer = await self._call("execute", {"sql": sql})
            for result in answer.get("results", []):
                self._result(result, None, 0)
        except Failed as e:
            self._error(e.fields)
        self.out += pgp.ready(self.session.status)

    def _result(self, result: dict, portal: Portal | None, max_rows: int, describe: bool = True,
                more: bool = False) -> bool:
        """Write one result; True when it was an error (the rest of the batch is skipped).
        With a row limit, rows past it wait in the portal; `more`: the portal's cursor may
        have more rows than these (PortalSuspended instead of CommandComplete)."""
        if "error" in result:
            self._error(result["error"])
            return True
        if result.get("empty"):
            self.out += pgp.EMPTY_QUERY
            return False
        if "columns" in result:
            asked = pgp.formats_for(portal.result_formats if portal else [], len(result["columns"]))
            if [c["format"] for c in result["columns"]] != asked:  # never bytes the client reads as something else
                self._error({"S": "ERROR", "V": "ERROR", "C": "XX000",
                             "M": "custody: the gateway answered in other result formats than the client asked for"})
                return True
            if describe:
                self.out += pgp.row_description(result["columns"], asked)
            rows = result["rows"]
            if portal is not None and max_rows > 0 and len(rows) > max_rows:
                portal.rows, portal.columns, portal.command = rows[max_rows:], result["columns"], result["command"]
                rows, more = rows[:max_rows], True
            self._rows(result["columns"], rows)
            if more:
                self.out += pgp.PORTAL_SUSPENDED
                return False
        self.out += pgp.command_complete(result.get("command", ""))
        return False

    def _rows(self, columns: list[dict], rows: list[list]) -> None:
        binary = [c["format"] == 1 for c in columns]
        out = self.out
        for row in rows:
            out += pgp.data_row([None if v is None else base64.b64decode(v) if binary[i] else v.encode()
                                 for i, v in enumerate(row)])

    # extended query

    async def _extended(self, batch: list[tuple[str, Any]], sync: bool) -> None:
        s = self.session
        executes = sum(1 for kind, _ in batch if kind == "E")
        implicit = sync and executes > 1 and s.status == "I"
        failed = False
        try:
            if implicit:  # several Executes before one Sync: one transaction, as on a real server
                await self._call("execute", {"sql": "BEGIN"})
            n = 0
            while n < len(batch) and not failed:
                kind, msg = batch[n]
                after = batch[n + 1] if n + 1 < len(batch) else None
                if kind == "D" and msg.kind == "P" and after and after[0] == "E" and after[1].portal == msg.name:
                    # Describe then Execute of one portal: one execution answers both
                    failed = await self._execute(self._portal(msg.name), after[1].max_rows, describe=True)
                    n += 2
                else:
                    failed = await self._step(kind, msg)
                    n += 1
        except Failed as e:
            self._error(e.fields)
            failed = True
        if implicit and s.status in ("T", "E"):
            try:
                await self._call("execute", {"sql": "ROLLBACK" if failed or s.status == "E" else "COMMIT"})
            except Failed as e:
                self._error(e.fields)
        self.discarding = failed and not sync  # after an error, messages up to Sync are ignored
        if sync:
            s.portals.pop("", None)
            self.out += pgp.ready(s.status)

    async def _step(self, kind: str, msg: Any) -> bool:
        """One extended-protocol message; True when it failed."""
        s = self.session
        if kind == "P":
            if msg.name and msg.name in s.statements:
                raise Failed({"S": "ERROR", "V": "ERROR", "C": "42P05",
                              "M": f'prepared statement "{msg.name}" already exists'})
            s.statements[msg.name] = (msg.sql, msg.types)
            self.out += pgp.PARSE_COMPLETE
        elif kind == "B":
            await self._bind(msg)
            self.out += pgp.BIND_COMPLETE
        elif kind == "C":
            closed = (s.statements if msg.kind == "S" else s.portals).pop(msg.name, None)
            if isinstance(closed, Portal) and closed.declared:
                await self._call("execute", {"sql": f'CLOSE "{closed.name.replace(chr(34), chr(34) * 2)}"'})
            self.out += pgp.CLOSE_COMPLETE
        elif kind == "D":
            await self._describe(msg)
        elif kind == "E":
            return await self._execute(self._portal(msg.portal), msg.max_rows, describe=False)
        return False

    def _portal(self, name: str) -> Portal:
        portal = self.session.portals.get(name)
        if portal is None:
            raise Failed({"S": "ERROR", "V": "ERROR", "C": "34000", "M": f'portal "{name}" does not exist'})
        return portal

    async def _bind(self, msg: Bind) -> None:
        s = self.session
        stmt = s.statements.get(msg.statement)
        if stmt is None:
            raise Failed({"S": "ERROR", "V": "ERROR", "C": "26000",
                          "M": f'prepared statement "{msg.statement}" does not exist'})
        formats = pgp.formats_for(msg.formats, len(msg.params))
        params = [None if v is None else base64.b64encode(v).decode() if formats[i] == 1 else v.decode("utf-8")
                  for i, v in enumerate(msg.params)]
        portal = Portal(msg.portal, stmt[0], stmt[1], params, formats, list(msg.result_formats))
        if msg.portal and s.status == "T":
            answer = await self._call("execute", {**self._run(portal), "declare": msg.portal})
            result = (answer.get("results") or [{}])[0]
            if "error" in result:
                raise Failed(result["error"])
            portal.declared = not result.get("deferred")
        s.portals[msg.portal] = portal

    @staticmethod
    def _run(portal: Portal) -> dict[str, Any]:
        return {"sql": portal.sql, "extended": True, "params": portal.params, "param_types": portal.types,
                "param_formats": portal.param_formats, "result_formats": portal.result_formats}

    async def _describe(self, msg: Describe) -> None:
        if msg.kind == "S":
            stmt = self.session.statements.get(msg.name)
            if stmt is None:
                raise Failed({"S": "ERROR", "V": "ERROR", "C": "26000",
                              "M": f'prepared statement "{msg.name}" does not exist'})
            sql, types, fmt = stmt[0], stmt[1], []
        elif msg.name and msg.name not in self.session.portals:
            # a cursor the client declared with SQL (DECLARE): it lives on the backend
            answer = await self._call("describe", {"portal": msg.name})
            result = (answer.get("results") or [{}])[0]
            if "error" in result:
                raise Failed(result["error"])
            columns = result.get("columns") or []
            self.out += pgp.row_description(columns) if columns else pgp.NO_DATA
            return
        else:
            portal = self._portal(msg.name)
            sql, types, fmt = portal.sql, portal.types, portal.result_formats
        answer = await self._call("describe", {"sql": sql, "param_types": types, "result_formats": fmt})
        result = (answer.get("results") or [{}])[0]
        if "error" in result:
            raise Failed(result["error"])
        if msg.kind == "S":
            self.out += pgp.parameter_description(result.get("params", []))
        columns = result.get("columns") or []
        if msg.kind == "S":  # a statement's result formats are not known until Bind
            self.out += pgp.row_description(columns, [0]) if columns else pgp.NO_DATA
        else:  # the formats the execution will really send (text when masks apply)
            self.out += pgp.row_description(columns, [c["format"] for c in columns]) if columns else pgp.NO_DATA

    async def _execute(self, portal: Portal, max_rows: int, *, describe: bool) -> bool:
        """Run the portal (once), or send what is left of a suspended run; a declared one
        fetches the rows asked for from its cursor."""
        if portal.declared:
            answer = await self._call("execute", {**self._run(portal), "fetch": portal.name, "max_rows": max_rows})
            result = (answer.get("results") or [{"empty": True}])[0]
            if "rows" in result:  # a FETCH's tag, as an Execute's
                result = {**result, "command": f"SELECT {len(result['rows'])}"}
            return self._result(result, portal, 0, describe=describe,
                                more=0 < max_rows == len(result.get("rows", ())))
        if portal.done:
            rows, portal.rows = portal.rows or [], None
            return self._result({"columns": portal.columns, "rows": rows, "command": portal.command}, portal,
                                max_rows, describe=False)
        answer = await self._call("execute", {
            "sql": portal.sql, "extended": True, "params": portal.params, "param_types": portal.types,
            "param_formats": portal.param_formats, "result_formats": portal.result_formats})
        result = (answer.get("results") or [{"empty": True}])[0]
        portal.done, portal.columns, portal.command = True, result.get("columns", []), result.get("command", "")
        if describe and "columns" not in result and "error" not in result:
            self.out += pgp.NO_DATA
        return self._result(result, portal, max_rows, describe=describe)


class Bridge:
    """Listens for one postgres connection's clients."""

    def __init__(self, connection: Connection, proxy: str) -> None:
        self.connection = connection
        self.gateway = Gateway(proxy, connection.hosts[0].split(":")[0])
        self.sessions: dict[tuple[int, int], Session] = {}
        self.tasks: set[asyncio.Task] = set()
        self.tls: ssl.SSLContext | None = None
        if connection.server_cert:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.load_cert_chain(connection.server_cert)
        self.server: asyncio.Server | None = None
        self.names, self.address = (connection.name,), connection.listen
        self.limits = connection.limits
        self.clients = 0

    async def start(self) -> None:
        host, port = self.connection.listen
        self.server = await asyncio.start_server(self._client, host, port)
        logger.info("pg_bridge: %s listening on %s:%d", self.connection.name, host, port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= self.limits.connections:
            self._too_many(writer)
            return
        self.clients += 1
        try:
            await Client(self, reader, writer).run()
        finally:
            self.clients -= 1

    def _too_many(self, writer: asyncio.StreamWriter) -> None:
        """Refuse a client past `limits.connections` at once, before reading anything, with
        the error PostgreSQL sends then (libpq reads it in place of an SSL answer too)."""
        writer.write(pgp.error({"S": "FATAL", "V": "FATAL", "C": "53300", "M": "sorry, too many clients already",
                                "D": f"custody: pg_bridge for {self.connection.name} accepts "
                                     f"{self.limits.connections} connections (limits.connections)"}))
        writer.close()

    async def cancel(self, pid: int, secret: int) -> None:
        """A CancelRequest: the gateway cancels what runs; a step still waiting (held for
        approval) is abandoned and the client gets 57014."""
        s = self.sessions.get((pid, secret))
        if s is None or s.inflight is None:
            return
        try:
            answer = await self.gateway.call(self.gateway.link(), "cancel", s.token, s.id, {})
            running = any(r.get("command") == "CANCEL" for r in answer.get("results", []))
        except Failed:
            running = False
        if not running and s.inflight is not None:
            s.cancelled = True
            s.inflight.cancel()

    def closing(self, s: Session) -> None:
        """Close a session at the gateway in the background (the task is kept until done)."""
        task = asyncio.ensure_future(self.close_session(s))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close_session(self, s: Session) -> None:
        try:
            await self.gateway.call(s.link, "close", s.token, s.id, {})
        except (Failed, LinkLost):
            pass  # the gateway closes idle sessions itself
        finally:
            s.link.close()
