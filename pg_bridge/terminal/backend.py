"""One real PostgreSQL connection per bridge session, driven through libpq on the event loop.

The executor needs what a direct client would get: every result of a multi-statement
string, column names and type OIDs, cells exactly as the server encoded them (text, or
binary where the client asked), command tags, notices, the server's own error fields and
the transaction state. psycopg's `pq` module is libpq itself, so it gives all of that
without a driver's type conversion in between; its non-blocking mode lets one event loop
drive every session (no thread per connection). Results are read in chunks so that an
oversized result is stopped at the cap instead of being held in memory whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from psycopg import OperationalError, pq
from psycopg.conninfo import make_conninfo

logger = logging.getLogger(__name__)

STATUS = {pq.TransactionStatus.IDLE: "I", pq.TransactionStatus.INTRANS: "T", pq.TransactionStatus.INERROR: "E",
          pq.TransactionStatus.ACTIVE: "T"}
REPORTED = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only", "in_hot_standby",
            "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding", "server_version",
            "session_authorization", "standard_conforming_strings", "TimeZone")
"""The parameters the server reports to clients (ParameterStatus), relayed as they change."""
STARTUP = ("DateStyle", "TimeZone", "IntervalStyle", "extra_float_digits", "bytea_output",
           "lc_monetary", "lc_numeric", "lc_time", "statement_timeout", "lock_timeout")
"""Startup settings a client may pass through to its session (none that changes how SQL
text is read or which function a name calls: see addons/classifiers/postgres/settings.py)."""
PINNED = {"standard_conforming_strings": "on", "client_encoding": "UTF8"}
"""What the classifier assumed when it parsed the SQL; checked before every execution."""
CHUNK_ROWS = 1000
CONVERT_BATCH = 10000
"""Values per conversion query (the protocol allows 65535 parameters)."""
SAVEPOINT = "custody_undo"
"""The savepoint under which the gateway's own planning runs inside a client's transaction."""
ROWS = (pq.ExecStatus.TUPLES_CHUNK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.SINGLE_TUPLE)
FIELDS = {f.value: chr(f.value) for f in pq.DiagnosticField}


class BackendError(Exception):
    """The backend could not be reached or failed; `fields` are ErrorResponse fields."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "backend error"))
        self.fields = fields


def error_fields(result: pq.PGresult) -> dict[str, str]:
    """An error or notice result as protocol fields: S, V, C, M, D, H, P, …"""
    out = {}
    for code, letter in FIELDS.items():
        value = result.error_field(pq.DiagnosticField(code))
        if value is not None:
            out[letter] = value.decode("utf-8", "replace")
    return out


def failure(code: str, message: str, severity: str = "ERROR", **more: str) -> dict[str, str]:
    """ErrorResponse fields for an error the gateway raises itself."""
    return {"S": severity, "V": severity, "C": code, "M": message, **more}


def conninfo(host: str, port: int, database: str, user: str, password: str, ca_file: str | None,
             settings: dict[str, str]) -> str:
    """libpq connection string: the upstream verified with the connection's CA when it has
    one (verify-full), else TLS when the server offers it; UTF8 and standard strings always
    (results travel as JSON; the classifier parsed the SQL that way). A setting whose value
    holds a control character is refused: the server splits `options` on any whitespace."""
    for k, v in settings.items():
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in k + v):
            raise BackendError(failure("22023", f"invalid startup parameter {k!r}: control characters"))
    chosen = {k: v for k, v in settings.items() if k in STARTUP} | PINNED
    options = " ".join(f"-c {k}={_escape(v)}" for k, v in chosen.items() if k != "client_encoding")
    return make_conninfo(
        host=host, port=port, dbname=database, user=user, password=password,
        sslmode="verify-full" if ca_file else "prefer", **({"sslrootcert": ca_file} if ca_file else {}),
        application_name=settings.get("application_name") or "custody pg_bridge", client_encoding="UTF8",
        connect_timeout=10, **({"options": options} if options else {}),
    )


def transaction_statuses(info: str, xids: list[str]) -> dict[str, str | None]:
    """pg_xact_status of each transaction id ("committed", "aborted", "in progress", or None:
    too old to know), asked of the database with the gateway's credential."""
    import psycopg

    with psycopg.connect(info, autocommit=True) as conn:
        return {x: conn.execute("SELECT txid_status(%s::bigint)", (int(x),)).fetchone()[0] for x in xids}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


@dataclass
class Output:
    """What one request produced, as the bridge relays it."""

    results: list[dict[str, Any]] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    status: str = "I"
    parameters: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    """The database connection is gone: the session is over (the bridge ends the client's
    connection after the last error, as a server that went away does)."""

    def as_dict(self) -> dict[str, Any]:
        return {"results": self.results, "notices": self.notices, "status": self.status,
                "parameters": self.parameters, **({"closed": True} if self.closed else {})}


class Backend:
    """A libpq connection in non-blocking mode, used by one request at a time."""

    def __init__(self, pg: pq.PGconn) -> None:
        self.pg = pg
        self.lock = asyncio.Lock()
        self.notices: list[dict[str, str]] = []
        self.reported = {k: self._parameter(k) for k in REPORTED}
        self.running = False
        self.lost = False
        """The server went away (or the connection broke): nothing more can run on it."""
        pg.notice_handler = lambda result: self.notices.append(error_fields(result))

    @classmethod
    async def connect(cls, info: str) -> Backend:
        pg = pq.PGconn.connect_start(info.encode())
        try:
            status = pq.PollingStatus.WRITING
            while status not in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
                await _ready(pg.socket, readable=status == pq.PollingStatus.READING)
                status = pg.connect_poll()
            if status == pq.PollingStatus.FAILED:
                message = pg.get_error_message().strip() or "connection failed"
                raise BackendError(failure("08001", f"the gateway could not connect to the database: {message}"))
        except BaseException:
            pg.finish()
            raise
        pg.nonblocking = 1
        return cls(pg)

    def _parameter(self, name: str) -> str | None:
        value = self.pg.parameter_status(name.encode())
        return value.decode() if value is not None else None

    @property
    def status(self) -> str:
        return STATUS.get(self.pg.transaction_status, "I")

    @property
    def parameters(self) -> dict[str, str]:
        return {k: v for k, v in self.reported.items() if v is not None}

    def changed_parameters(self) -> dict[str, str]:
        changed = {}
        for name in REPORTED:
            value = self._parameter(name)
            if value is not None and value != self.reported.get(name):
                changed[name] = value
                self.reported[name] = value
        return changed

    async def _flush(self) -> None:
        while self.pg.flush() == 1:
            await _ready(self.pg.socket, readable=False)

    async def _results(self):
        """Every result of what was sent, as libpq completes them."""
        while True:
            self.pg.consume_input()
            while not self.pg.is_busy():
                result = self.pg.get_result()
                if result is None:
                    return
                yield result
            await _ready(self.pg.socket, readable=True)

    @contextlib.contextmanager
    def _io(self):
        """Any failure of the connection itself (libpq raises OperationalError: the server
        closed it, the socket broke) ends the session with 08006."""
        try:
            yield
        except OperationalError:
            raise self._closed() from None
        if self.pg.status == pq.ConnStatus.BAD:
            raise self._closed()

    def _closed(self) -> BackendError:
        self.lost = True
        message = self.pg.get_error_message().strip() or "the database connection was lost"
        return BackendError(failure("08006", f"the gateway's database connection failed: {message}", "FATAL"))

    def drifted(self) -> dict[str, str] | None:
        """Error fields when the session no longer reads SQL the way the classifier did."""
        for name, value in PINNED.items():
            if self._parameter(name) != value:
                return failure("0A000", f"the session's {name} is not {value}; the gateway cannot govern it: reconnect")
        return None

    async def execute(self, sql: str, *, extended: bool = False, params: list | None = None,
                      types: list[int] | None = None, formats: list[int] | None = None,
                      result_format: int = 0, max_bytes: int, guard=None) -> Output:
        """Run `sql` as the client asked: the simple protocol (one or more statements) or
        the extended one with parameters; results past `max_bytes` end in error 54000.
        `guard()`, called once the connection is this request's, may refuse it (error fields)."""
        async with self.lock:
            self.notices = []
            if problem := self.drifted() or (guard() if guard else None):
                return Output(results=[{"error": problem}], status=self.status)
            out = Output()
            try:
                with self._io():
                    if extended:
                        self.pg.send_query_params(sql.encode(), _values(params or [], formats or []), types or None,
                                                  formats or None, result_format)
                    else:
                        self.pg.send_query(sql.encode())
                    self.pg.set_chunked_rows_mode(CHUNK_ROWS)
                    await self._flush()
                    self.running = True
                    await self._collect(out, max_bytes)
            except BackendError as e:
                out.results.append({"error": e.fields})  # what the server said before it went, then 08006
                out.closed = True
            finally:
                self.running = False
            out.notices, out.status, out.parameters = self.notices, self.status, self.changed_parameters()
            return out

    async def xid(self) -> str | None:
        """The id of the transaction the session is in, once it has one (it has written);
        recorded with the response so that, after a crash, whether it committed can be
        looked up (addons/engine/reconcile.py)."""
        async with self.lock:
            self.notices = []
            with self._io():
                self.pg.send_query(b"SELECT txid_current_if_assigned()")
                await self._flush()
                values = [r.get_value(0, 0) async for r in self._results()
                          if r.status == pq.ExecStatus.TUPLES_OK and r.ntuples]
        return values[0].decode() if values and values[0] else None

    async def _collect(self, out: Output, max_bytes: int) -> None:
        current: dict[str, Any] | None = None
        size, over = 0, False
        async for r in self._results():
            status = r.status
            if over:
                continue  # draining after a cancel
            if status in ROWS:
                if current is None:
                    current = {"columns": _columns(r), "rows": []}
                rows, added = _rows(r)
                current["rows"] += rows
                size += added
                if size > max_bytes:
                    over = True
                    await asyncio.to_thread(self.pg.get_cancel().cancel)
                    out.results.append({"error": failure(
                        "54000", f"the result is larger than the gateway allows ({max_bytes} bytes); "
                                 "nothing was returned: select fewer rows or columns (LIMIT)")})
                    current = None
                    continue
                if r.command_status:  # in chunked mode the tag may come with the last chunk
                    current["command"] = r.command_status.decode()
                if status == pq.ExecStatus.TUPLES_OK:
                    current.setdefault("command", f"SELECT {len(current['rows'])}")
                    out.results.append(current)
                    current = None
            elif status == pq.ExecStatus.COMMAND_OK:
                out.results.append({"command": r.command_status.decode()})
            elif status == pq.ExecStatus.EMPTY_QUERY:
                out.results.append({"empty": True})
            elif status in (pq.ExecStatus.COPY_IN, pq.ExecStatus.COPY_OUT, pq.ExecStatus.COPY_BOTH):
                await self._refuse_copy(status)
                out.results.append({"error": failure(
                    "0A000", "COPY FROM STDIN / TO STDOUT is not supported through the gateway",
                    H="Use INSERT … VALUES to load rows and SELECT to read them.")})
                over = True
            else:
                out.results.append({"error": error_fields(r)})

    async def _refuse_copy(self, status: pq.ExecStatus) -> None:
        if status == pq.ExecStatus.COPY_IN:
            while self.pg.put_copy_end(b"COPY is not supported through the gateway") == 0:
                await _ready(self.pg.socket, readable=False)
            await self._flush()
        else:
            await asyncio.to_thread(self.pg.get_cancel().cancel)

    async def describe(self, sql: str, types: list[int] | None = None) -> Output:
        """Parameter and result types of `sql`, as the server plans it (nothing runs). Parsing
        locks the tables a statement names until its transaction ends, so inside the
        client's transaction it is done under a savepoint that is rolled back: describing a
        statement leaves nothing behind, whatever policy then says about running it."""
        async with self.lock:
            self.notices = []
            out = Output()
            with self._io():
                prepared, described = await self._undone([
                    lambda: self.pg.send_prepare(b"", sql.encode(), types or None),
                    lambda: self.pg.send_describe_prepared(b"")])
            failed = [r for r in prepared + described if r.status not in (pq.ExecStatus.COMMAND_OK,
                                                                         pq.ExecStatus.PIPELINE_ABORTED)]
            if failed:
                out.results.append({"error": error_fields(failed[0])})
            elif described:
                r = described[-1]
                out.results.append({"params": [r.param_type(i) for i in range(r.nparams)], "columns": _columns(r)})
            out.notices, out.status = self.notices, self.status
            return out

    async def describe_portal(self, name: str) -> Output:
        """Result columns of a cursor the session declared (DECLARE name CURSOR …)."""
        async with self.lock:
            self.notices = []
            out = Output()
            with self._io():
                self.pg.send_describe_portal(name.encode())
                await self._flush()
                async for r in self._results():
                    out.results.append({"columns": _columns(r)} if r.status == pq.ExecStatus.COMMAND_OK
                                       else {"error": error_fields(r)})
            out.notices, out.status = self.notices, self.status
            return out

    async def explain(self, sql: str, params: list | None, types: list[int] | None,
                      formats: list[int] | None) -> int | None:
        """The planner's estimate of the rows a write touches; None when it cannot plan it.
        Planning locks the tables the statement names (RowExclusiveLock for a write's
        target) until the transaction ends, so inside the client's transaction it runs under
        a savepoint that is rolled back, which releases them: a statement policy then denies
        leaves no lock behind. In a failed transaction nothing can be planned."""
        async with self.lock:
            if self.status == "E":
                return None
            try:
                with self._io():
                    (results,) = await self._undone([lambda: self.pg.send_query_params(
                        f"EXPLAIN (FORMAT JSON) {sql}".encode(), _values(params or [], formats or []),
                        types or None, formats or None, 0)])
            finally:
                self.notices = []
            plan = next((r.get_value(0, 0) for r in results if r.status in ROWS and r.ntuples), None)
            return None if plan is None else written_rows(json.loads(plan)[0]["Plan"])

    async def binary(self, oids: list[int], texts: list[str]) -> list[bytes]:
        """Each text value as its type's binary form, by this session's server (its
        DateStyle, TimeZone and IntervalStyle read the text as they wrote it): `SELECT $1,
        …` with each value a parameter of its type, results in binary. Under a savepoint in
        a transaction, so a value it cannot read leaves the client's transaction as it was."""
        out: list[bytes] = []
        async with self.lock:
            for start in range(0, len(texts), CONVERT_BATCH):
                oids_, texts_ = oids[start:start + CONVERT_BATCH], texts[start:start + CONVERT_BATCH]
                query = "SELECT " + ", ".join(f"${n + 1}" for n in range(len(texts_)))
                with self._io():
                    (results,) = await self._undone([lambda q=query, o=oids_, t=texts_: self.pg.send_query_params(
                        q.encode(), [v.encode() for v in t], o, None, 1)])
                row = next((r for r in results if r.status in ROWS and r.ntuples), None)
                if row is None:
                    failed = next((error_fields(r) for r in results if r.status == pq.ExecStatus.FATAL_ERROR), {})
                    raise BackendError(failure("XX000", "custody: a masked result could not be encoded in the "
                                                        f"format the client asked for: {failed.get('M', '')}"))
                out += [row.get_value(0, i) for i in range(row.nfields)]
        return out

    async def _undone(self, steps: list) -> list[list[pq.PGresult]]:
        """Send `steps` (libpq send calls) in one round trip and leave the session as it was:
        inside a transaction block they run under a savepoint that is then rolled back (which
        releases every lock they took); outside one, in their own implicit transaction. The
        results of each step, in order."""
        if self.status != "T":
            return await self._pipeline(steps)
        undo = [self._send(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}"), self._send(f"RELEASE SAVEPOINT {SAVEPOINT}")]
        results = await self._pipeline([self._send(f"SAVEPOINT {SAVEPOINT}"), *steps, *undo])
        if any(r.status == pq.ExecStatus.PIPELINE_ABORTED for r in results[-1]):
            await self._pipeline(undo)  # a step failed, so the pipeline skipped the undo: undo now
        return results[1:1 + len(steps)]

    def _send(self, sql: str):
        return lambda: self.pg.send_query_params(sql.encode(), None, None, None, 0)

    async def _pipeline(self, steps: list) -> list[list[pq.PGresult]]:
        """libpq pipeline mode: every step sent, one Sync, the results of each step."""
        self.pg.enter_pipeline_mode()
        out: list[list[pq.PGresult]] = [[] for _ in steps]
        try:
            for send in steps:
                send()
            self.pg.pipeline_sync()
            await self._flush()
            step = 0
            while True:
                self.pg.consume_input()
                while not self.pg.is_busy():
                    r = self.pg.get_result()
                    if r is None:
                        step += 1  # the end of one step's results
                    elif r.status == pq.ExecStatus.PIPELINE_SYNC:
                        return out
                    else:
                        out[min(step, len(steps) - 1)].append(r)
                await _ready(self.pg.socket, readable=True)
        finally:
            if self.pg.status == pq.ConnStatus.OK:
                self.pg.exit_pipeline_mode()

    def cancel(self) -> bool:
        """Ask the server to cancel what this session runs (blocking: call in a thread)."""
        if not self.running:
            return False
        self.pg.get_cancel().cancel()
        return True

    def close(self) -> None:
        self.pg.finish()


def written_rows(plan: dict[str, Any]) -> int:
    """Rows a plan will change or lock: what feeds its ModifyTable nodes, and what its
    LockRows nodes (SELECT … FOR UPDATE) return."""
    total = 0
    if plan.get("Node Type") == "LockRows":
        total += int(plan.get("Plan Rows", 0))
    elif plan.get("Node Type") == "ModifyTable":
        total += sum(int(child.get("Plan Rows", 0)) for child in plan.get("Plans", [])
                     if child.get("Parent Relationship") in (None, "Outer", "Member"))
    for child in plan.get("Plans", []):
        total += written_rows(child)
    return total


def _values(params: list, formats: list[int]) -> list[bytes | None]:
    """Parameters as the bridge sent them: text as strings, binary as base64, NULL as None."""
    out = []
    for n, value in enumerate(params):
        binary = (formats[n] if n < len(formats) else formats[0] if len(formats) == 1 else 0) == 1
        if value is None:
            out.append(None)
        elif binary:
            out.append(base64.b64decode(value))
        else:
            out.append(value.encode())
    return out


def _columns(r: pq.PGresult) -> list[dict[str, Any]]:
    return [{"name": (r.fname(i) or b"").decode(), "table_oid": r.ftable(i), "column": r.ftablecol(i),
             "type_oid": r.ftype(i), "type_size": r.fsize(i), "type_modifier": r.fmod(i), "format": r.fformat(i)}
            for i in range(r.nfields)]


def _rows(r: pq.PGresult) -> tuple[list[list[str | None]], int]:
    """Cells of a result: text cells as strings, binary ones base64; and their size."""
    binary = [r.fformat(i) == 1 for i in range(r.nfields)]
    rows, size = [], 0
    for row in range(r.ntuples):
        cells = []
        for col in range(r.nfields):
            value = r.get_value(row, col)
            if value is None:
                cells.append(None)
                continue
            size += len(value)
            cells.append(base64.b64encode(value).decode() if binary[col] else value.decode("utf-8", "replace"))
        rows.append(cells)
    return rows, size


async def _ready(fd: int, *, readable: bool) -> None:
    """Wait until libpq's socket can be read (or written)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    (loop.add_reader if readable else loop.add_writer)(fd, wake)
    try:
        await done
    finally:
        (loop.remove_reader if readable else loop.remove_writer)(fd)
