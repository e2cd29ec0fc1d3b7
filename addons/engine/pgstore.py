"""The shared audit store: PostgreSQL, for any number of gateway replicas on any hosts.

The same tables, hashing and interface as the SQLite store (addons/engine/store.py); the
schema is created and migrated here (`MIGRATIONS`, recorded in `custody_meta`, applied
under an advisory lock so replicas starting together migrate once).

One chain, serialised in the database. Each replica commits in groups from its writer
thread; a group is one call of `custody_append`, which locks the chain head's row, gives
the group's events the next sequence numbers and links each to the one before it, inside
the database: the replica sends what each event's hash covers except its sequence number
and previous hash (`link_middle`), so appending costs one round trip per group whatever the
number of replicas, and the head's row lock is held only while the server links and
inserts. Any number of concurrent writers never fork the chain and never lose an event.

Approval changes lock their rows (`FOR UPDATE`, in id order) in the same transaction, and
announce themselves with NOTIFY on commit, which every replica LISTENs for (`listen`): the
replica holding a flow learns that approvers on another replica decided it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from addons.engine.model import new_id
from addons.engine.store import (
    APPROVAL_COLUMNS,
    BODY_COLUMNS,
    CHECKPOINT_COLUMNS,
    COLUMNS,
    DIRECTORY_COLUMNS,
    GENESIS,
    GRANT_COLUMNS,
    INDEXES,
    PIN_COLUMNS,
    REPLICA_COLUMNS,
    SCHEMA_VERSION,
    SIGNIN_COLUMNS,
    SLACK_SEEN_COLUMNS,
    WEB_SESSION_COLUMNS,
    TOOL_CALL_COLUMNS,
    TOOL_CALL_INDEX,
    TOOL_CALL_KEY,
    SINK_COLUMNS,
    AuditStore,
    Event,
    StoreError,
    Tx,
    approval_row,
    link_middle,
)

CHANNEL = "custody_approvals"
TYPES = {int: "bigint", str: "text", float: "double precision", bytes: "bytea"}
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
"""A peer that vanished (a host down, a partition) is noticed in seconds, not hours."""


def _table(name: str, columns: dict[str, type], key: str, not_null: set[str]) -> str:
    cols = [f"{c} {TYPES[t]}" + (" PRIMARY KEY" if c == key else " NOT NULL" if c in not_null else "")
            for c, t in columns.items()]
    return f"CREATE TABLE {name} ({', '.join(cols)})"


ROW = [c for c in COLUMNS if c not in ("seq", "prev_hash", "hash")]
"""What a replica sends of each event: everything but what the database assigns under its lock."""

APPEND = """
CREATE OR REPLACE FUNCTION custody_append(batch jsonb, middles text[], digests text[], sizes bigint[],
                                          encodings text[], data bytea[], changed jsonb) RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
  head_seq bigint;
  head_hash text;
  prevs text[] := '{}';
  hashes text[] := '{}';
BEGIN
  IF jsonb_array_length(changed) > 0 THEN
    INSERT INTO approvals SELECT * FROM jsonb_populate_recordset(NULL::approvals, changed)
      ON CONFLICT (id) DO UPDATE SET %(approvals)s;
    PERFORM pg_notify('%(channel)s', a.id) FROM jsonb_populate_recordset(NULL::approvals, changed) AS a;
  END IF;
  IF cardinality(middles) = 0 THEN
    RETURN NULL;
  END IF;
  -- the head first: a prune, which also locks it, never removes a body these events are about to name
  SELECT seq, hash INTO head_seq, head_hash FROM chain_head WHERE id = 1 FOR UPDATE;
  IF NOT FOUND THEN
    head_seq := 0;
    head_hash := repeat('0', 64);
    INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, head_hash);
  END IF;
  IF cardinality(digests) > 0 THEN
    INSERT INTO bodies (digest, size, encoding, data) SELECT * FROM unnest(digests, sizes, encodings, data)
      ON CONFLICT DO NOTHING;
  END IF;
  FOR i IN 1 .. cardinality(middles) LOOP
    prevs := prevs || head_hash;
    head_hash := encode(sha256(convert_to(
      head_hash || '[' || (head_seq + i) || ',' || middles[i] || ',"' || head_hash || '"]', 'UTF8')), 'hex');
    hashes := hashes || head_hash;
  END LOOP;
  INSERT INTO events (seq, %(columns)s, prev_hash, hash)
    SELECT head_seq + r.n, %(values)s, prevs[r.n], hashes[r.n]
    FROM ROWS FROM (jsonb_to_recordset(batch) AS (%(types)s)) WITH ORDINALITY AS r(%(columns)s, n);
  head_seq := head_seq + cardinality(middles);
  UPDATE chain_head SET seq = head_seq, hash = head_hash WHERE id = 1;
  RETURN head_seq;
END
$fn$
""" % {"approvals": ", ".join(f"{c} = excluded.{c}" for c in APPROVAL_COLUMNS if c != "id"), "channel": CHANNEL,
       "columns": ", ".join(ROW), "values": ", ".join(f"r.{c}" for c in ROW),
       "types": ", ".join(f"{c} {TYPES[COLUMNS[c]]}" for c in ROW)}
"""One group commit, one statement: the approvals' new documents (announced to every
replica on commit), the bodies, and the events chained after the head under the head's
row lock (see the module docstring): event n's hash is SHA-256 over the previous hash and
`[seq,` + its middle + `,"previous hash"]`, which is `chain_hash` in addons/engine/store.py."""

JSON_EXTRACT = """
CREATE OR REPLACE FUNCTION json_extract(doc text, path text) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
  SELECT (doc::jsonb) #>> string_to_array(substr(path, 3), '.')
$fn$
"""
"""SQLite's json_extract for the `$.a.b` paths the readers use, so one SQL serves both."""

MIGRATIONS: dict[int, list[str]] = {
    3: [
        _table("events", COLUMNS, "seq", {"id", "ts", "kind", "prev_hash", "hash"}),
        "ALTER TABLE events ADD UNIQUE (id)",
        *(f"CREATE INDEX events_{'_'.join(cols)} ON events ({', '.join(cols)})" for cols in INDEXES),
        _table("chain_head", {"id": int, "seq": int, "hash": str}, "id", {"seq", "hash"}),
        f"INSERT INTO chain_head (id, seq, hash) VALUES (1, 0, '{GENESIS}')",
        _table("checkpoints", CHECKPOINT_COLUMNS, "seq", set(CHECKPOINT_COLUMNS)),
        _table("anchors", CHECKPOINT_COLUMNS, "seq", set(CHECKPOINT_COLUMNS)),
        _table("bodies", BODY_COLUMNS, "digest", set(BODY_COLUMNS)),
        _table("approvals", APPROVAL_COLUMNS, "id", {"state", "created", "document"}),
        "CREATE INDEX approvals_state ON approvals (state)",
        "CREATE INDEX approvals_fingerprint ON approvals (fingerprint)",
        _table("replicas", REPLICA_COLUMNS, "id", set()),
        _table("mcp_pins", PIN_COLUMNS, "", set(PIN_COLUMNS)),
        "ALTER TABLE mcp_pins ADD PRIMARY KEY (connection, tool)",
        APPEND,
        JSON_EXTRACT,
    ],
    4: [
        _table("grants", GRANT_COLUMNS, "id", {"approval", "subject", "expires", "document"}),
        "CREATE INDEX grants_subject_connection ON grants (subject, connection)",
        "CREATE INDEX approvals_updated ON approvals (updated)",
        _table("approver_directory", DIRECTORY_COLUMNS, "email", set(DIRECTORY_COLUMNS)),
    ],
    5: [
        _table("tool_calls", TOOL_CALL_COLUMNS, "", set(TOOL_CALL_COLUMNS)),
        f"ALTER TABLE tool_calls ADD PRIMARY KEY ({', '.join(TOOL_CALL_KEY)})",
        f"CREATE INDEX tool_calls_{'_'.join(TOOL_CALL_INDEX)} ON tool_calls ({', '.join(TOOL_CALL_INDEX)})",
    ],
    6: [
        *(statement for name, columns in (("web_sessions", WEB_SESSION_COLUMNS), ("signins", SIGNIN_COLUMNS),
                                          ("slack_seen", SLACK_SEEN_COLUMNS))
          for statement in (_table(name, columns, "key", set(columns)),
                            f"CREATE INDEX {name}_expires ON {name} (expires)")),
    ],
    7: [
        _table("sink_cursors", SINK_COLUMNS, "sink", set(SINK_COLUMNS)),
    ],
}
"""Schema versions and the statements that reach each from the one before (3 is the first
PostgreSQL schema: the SQLite store's version 3, with the same tables and columns; 4 adds
time-boxed grants and the approver directory; 5 the tool calls completions asked for; 6
approvers' web sessions, sign-ins in progress and Slack's seen requests, so any replica
serves any step of them).; 7 the audit
sinks' cursors)."""


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """SQLite's `?` placeholders as psycopg's `%s` (outside string literals), `%` escaped."""
    out, quoted = [], False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        out.append("%%" if ch == "%" else "%s" if ch == "?" and not quoted else ch)
    return "".join(out)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = (parts.username or "") + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[-1]}"))


class PgTx(Tx):
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, args: Sequence[Any] = (), stream: bool = False) -> Iterator[dict[str, Any]]:
        if stream:  # a server-side cursor: a whole log is never in memory at once
            with self.conn.cursor(name=f"custody_{new_id()}", row_factory=dict_row) as cursor:
                cursor.itersize = 2000
                cursor.execute(translate(sql), args)
                yield from cursor
            return
        with self.conn.cursor(row_factory=dict_row) as cursor:
            cursor.execute(translate(sql), args)
            found = cursor.fetchall()
        yield from found

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        return self.conn.execute(translate(sql), args).fetchone()

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self.conn.execute(translate(sql), args).rowcount

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(translate(sql), rows)


class PgStore(AuditStore):
    """The audit store in PostgreSQL. Reads, heartbeats and approval lookups share a pool;
    the writer (`dedicated`) keeps one connection of its own, so a group commit never
    waits for the pool, and a store that went away fails the next commit at once (and is
    connected to again by the one after)."""

    NOW = "extract(epoch from clock_timestamp())::double precision"
    LOCK_HEAD = "SELECT seq FROM chain_head WHERE id = 1 FOR UPDATE"
    SESSIONS = ("string_agg(DISTINCT subject, ',') AS subjects, string_agg(DISTINCT agent, ',') AS agents, "
                "string_agg(DISTINCT connection, ',') AS connections, "
                "COUNT(*) FILTER (WHERE kind = 'request') AS requests, "
                "COUNT(*) FILTER (WHERE kind = 'decision' AND effect = 'deny') AS denied, "
                "COUNT(*) FILTER (WHERE kind = 'approval' AND json_extract(detail, '$.step') = 'requested') AS held")

    def __init__(self, url: str, replica: str = "", *, dedicated: bool = False, pool_size: int = 4,
                 timeout: float = 5.0) -> None:
        from addons.engine.store import default_replica

        self.url, self.location = url, redact(url)
        self.replica = replica or default_replica()
        self.timeout = timeout
        self.pool = None
        self._conn: psycopg.Connection | None = None
        try:
            if dedicated:
                self._conn = self._connect()
            else:
                from psycopg_pool import ConnectionPool

                self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout, open=True,
                                           kwargs={"autocommit": True, **KEEPALIVE}, name="custody-store")
                self.pool.wait(timeout)
            self._ensure_schema()
        except StoreError:
            self.close()
            raise
        except Exception as e:  # psycopg.Error, the pool's PoolTimeout
            self.close()
            raise StoreError(f"{self.location}: cannot use the PostgreSQL audit store: {e}") from None

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.timeout)), **KEEPALIVE)

    def _ensure_schema(self) -> None:
        with self._connection() as conn:
            try:
                row = conn.execute("SELECT value FROM custody_meta WHERE key = 'schema_version'").fetchone()
            except psycopg.errors.UndefinedTable:
                row = None
            if row is not None and int(row[0]) == SCHEMA_VERSION:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('custody audit store schema'))")
                conn.execute("CREATE TABLE IF NOT EXISTS custody_meta (key text PRIMARY KEY, value text NOT NULL)")
                row = conn.execute("SELECT value FROM custody_meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise StoreError(f"{self.location}: audit store schema version {version}, but this gateway "
                                     f"writes version {SCHEMA_VERSION}: upgrade this gateway")
                try:
                    for step in sorted(v for v in MIGRATIONS if v > version):
                        for statement in MIGRATIONS[step]:
                            conn.execute(statement)
                except psycopg.errors.DuplicateTable as e:
                    raise StoreError(f"{self.location}: the database holds tables that are not a Custody audit "
                                     f"store ({e.diag.message_primary}); use a database of its own") from None
                conn.execute("INSERT INTO custody_meta (key, value) VALUES ('schema_version', %s) "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value", [str(SCHEMA_VERSION)])

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if self.pool is not None:
            with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
            return
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        try:
            yield self._conn
        except psycopg.OperationalError:
            self._conn.close()  # connect again for the next commit
            raise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self._conn is not None:
            self._conn.close()

    @contextmanager
    def _read(self, snapshot: bool = False) -> Iterator[Tx]:
        with self._connection() as conn, conn.transaction():
            if snapshot:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield PgTx(conn)

    @contextmanager
    def _write(self, single: bool = False) -> Iterator[Tx]:
        with self._connection() as conn:
            if single:  # one statement, in autocommit: its own transaction, one round trip
                yield PgTx(conn)
                return
            with conn.transaction():
                yield PgTx(conn)

    def _lock(self, tx: Tx, ids: list[str]) -> dict[str, dict[str, Any]]:
        import json

        return {r["id"]: json.loads(r["document"]) for r in tx.rows(
            "SELECT id, document FROM approvals WHERE id = ANY(?) ORDER BY id FOR UPDATE", [ids])}

    def _save(self, tx: Tx, events: list[Event], approvals: list[dict[str, Any]]) -> None:
        rows, bodies = self._prepared(events)
        kept = list(zip(*[(d, *b) for d, b in bodies.items()])) or [[], [], [], []]
        changed = [dict(zip(APPROVAL_COLUMNS, approval_row(d))) for d in approvals]
        tx.run("SELECT custody_append(?::jsonb, ?::text[], ?::text[], ?::bigint[], ?::text[], ?::bytea[], ?::jsonb)",
               [Jsonb([{c: r[c] for c in ROW} for r in rows]), [link_middle(r) for r in rows], *map(list, kept),
                Jsonb(changed)])

    def listen(self, changed: Callable[[str | None], None]) -> Callable[[], None]:
        """LISTEN on a connection of its own, in a thread; connects again after a failure,
        and then reports a gap (`changed(None)`): notifications are not queued for a
        listener that was away."""
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    with self._connect() as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        changed(None)
                        while not stop.is_set():
                            for notification in conn.notifies(timeout=1.0):
                                changed(notification.payload)
                except psycopg.Error:
                    stop.wait(1.0)

        threading.Thread(target=run, name="custody-store-listener", daemon=True).start()
        return stop.set
