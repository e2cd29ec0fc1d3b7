"""The audit store: an append-only, hash-chained log of events in SQLite (WAL).

Its schema is the contract the CLI and exporters read. Each event stores the hash of the
event before it; an event's hash is SHA-256 over the previous hash and a canonical JSON
encoding of every column (the body is covered through its digest). `chain_head` holds the
last sequence number and hash, written in the same transaction, so removing events from the
end is detected as well as editing, deleting or reordering rows anywhere.

Appends run `BEGIN IMMEDIATE`, read the head inside the transaction and commit, so two
writers on one file cannot fork the chain.

Bodies are kept once per distinct content, deflated, in `bodies` (keyed by their SHA-256);
an event refers to its body by `body_digest`, which is what the chain covers, so where a
body is kept does not change any hash. Readers get rows with `body` filled in as before.
Stores of schema version 1 (bodies inline) are upgraded in place: old inline bodies stay
where they are and still verify.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from addons.engine.config import StoreConfig
from addons.engine.model import Decision, Operation, Principal, canonical_json, new_id

GENESIS = "0" * 64
SCHEMA_VERSION = 2  # PRAGMA user_version: bumped when tables, columns or hashing change
UPGRADABLE = (1,)  # versions this one upgrades in place (1: bodies inline in events)


class StoreError(Exception):
    """The audit store cannot be used as it is; the message says why and what to do."""

# Column name -> SQLite type. Order is the canonical order for hashing.
COLUMNS: dict[str, type] = {
    "seq": int,
    "id": str,
    "ts": float,
    "kind": str,
    "session": str,
    "flow": str,
    "approval": str,
    "subject": str,
    "issuer": str,
    "agent": str,
    "model": str,
    "connection": str,
    "protocol": str,
    "action": str,
    "resource": str,
    "risk": int,
    "effect": str,
    "rules": str,
    "reason": str,
    "status": int,
    "principal": str,
    "operation": str,
    "detail": str,
    "body": bytes,
    "body_digest": str,
    "body_size": int,
    "prev_hash": str,
    "hash": str,
}
HASHED = [c for c in COLUMNS if c not in ("hash", "body")]
INDEXES = (["session"], ["flow"], ["approval"])

# Approvals: the current state of each review (the hash chain holds every step of it).
APPROVAL_COLUMNS: dict[str, type] = {
    "id": str,
    "state": str,
    "created": float,
    "updated": float,
    "subject": str,
    "connection": str,
    "fingerprint": str,
    "held": int,
    "expires": float,
    "document": str,
}


# Checkpoints: the signed hash and extent of each pruned prefix of the chain. Anchors: the
# signed hash of an event a full verification reached, where the next one may start.
CHECKPOINT_COLUMNS: dict[str, type] = {"seq": int, "document": str, "signature": str}
# Bodies: each distinct body once, by its digest; `encoding` is "deflate" or "identity".
BODY_COLUMNS: dict[str, type] = {"digest": str, "size": int, "encoding": str, "data": bytes}
TABLES = ("events", "chain_head", "checkpoints", "anchors", "approvals", "bodies", "mcp_pins", "grants",
          "approver_directory")


def pack(body: bytes) -> tuple[str, bytes]:
    """A body as kept: deflated when that makes it smaller."""
    deflated = zlib.compress(body, 6)
    return ("deflate", deflated) if len(deflated) < len(body) else ("identity", body)


def unpack(encoding: str, data: bytes) -> bytes:
    """A kept body as it was; damaged data is returned as it is (its digest then says so)."""
    if encoding != "deflate":
        return data
    try:
        return zlib.decompress(data)
    except zlib.error:
        return data

# MCP tool pins: the definition of each tool as first seen (the chain holds the event that
# pinned it; this table outlives a prune, so a pin is never silently re-learned).
PIN_COLUMNS: dict[str, type] = {"connection": str, "tool": str, "fingerprint": str, "created": float,
                                "definition": str}


# Grants: the current state of each time-boxed grant (the chain holds the approval that
# issued it and its revocation). Directory: the IdP identity each approver's e-mail had at
# their last SSO sign-in, which binds a Slack user to an approver.
GRANT_COLUMNS: dict[str, type] = {"id": str, "approval": str, "subject": str, "connection": str, "expires": float,
                                  "revoked": float, "document": str}
DIRECTORY_COLUMNS: dict[str, type] = {"email": str, "subject": str, "issuer": str, "groups": str, "method": str,
                                      "signed_in": float}


def _json(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"}
)


def headers_for_record(headers: Any) -> list[list[str]]:
    """Headers (name/value pairs, or anything with `.items()`) as recorded: credential-bearing
    values are replaced by [redacted]."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    return [[k, "[redacted]" if k.lower() in SECRET_HEADERS else v] for k, v in pairs]


def body_fields(content: bytes | None, settings: StoreConfig) -> dict[str, Any]:
    """The body, its digest or only its size, as the store configuration says."""
    if content is None:
        return {}
    fields: dict[str, Any] = {"body_size": len(content)}
    if settings.bodies != "none":
        fields["body_digest"] = digest(content)
    if settings.bodies == "full" and len(content) <= settings.max_body:
        fields["body"] = content
    return fields


@dataclass
class Event:
    """One row of the audit log before it is chained.

    `connection` names the connection when there is no Operation (a refused tunnel).
    """

    id: str
    kind: str
    session: str = ""
    flow: str = ""
    principal: Principal | None = None
    operation: Operation | None = None
    connection: str = ""
    decision: Decision | None = None
    approval: str = ""
    status: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    body: bytes | None = None
    body_digest: str | None = None
    body_size: int | None = None
    ts: float = field(default_factory=time.time)

    def row(self) -> dict[str, Any]:
        p, op, d = self.principal, self.operation, self.decision
        if self.body is not None and self.body_digest is None:
            self.body_digest = digest(self.body)
        detail = {**self.detail, "decision": d.as_dict()} if d else self.detail
        return {
            "id": self.id,
            "ts": self.ts,
            "kind": self.kind,
            "session": self.session or None,
            "flow": self.flow or None,
            "approval": self.approval or None,
            "subject": p.subject if p else None,
            "issuer": p.issuer if p else None,
            "agent": (p.attribute("agent") or None) if p else None,
            "model": (p.attribute("model") or None) if p else None,
            "connection": op.connection if op else (self.connection or None),
            "protocol": op.protocol if op else None,
            "action": op.action if op else None,
            "resource": op.resource if op else None,
            "risk": op.risk if op else None,
            "effect": d.effect if d else None,
            "rules": _json(list(d.rules)) if d else None,
            "reason": d.reason if d else None,
            "status": self.status,
            "principal": p.json if p else None,
            "operation": op.json if op else None,
            "detail": _json(detail),
            "body": self.body,
            "body_digest": self.body_digest,
            "body_size": self.body_size,
        }


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    canonical = json.dumps([row[c] for c in HASHED], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    head: str
    broken_at: int | None = None
    problem: str = ""
    checkpoint: dict[str, Any] | None = None
    first: int = 1
    """The first event walked: 1, the one after the checkpoint, or the one after an anchor."""
    last: int = 0
    """The last event walked (the chain head when it verified)."""


def put_approval(row: tuple) -> Callable[[sqlite3.Connection], None]:
    """The write of an approval's current state, to run inside the transaction that
    appends the event recording the change (Store.append's `apply`)."""

    def apply(conn: sqlite3.Connection) -> None:
        conn.execute(f"INSERT OR REPLACE INTO approvals VALUES ({', '.join('?' * len(APPROVAL_COLUMNS))})", row)

    return apply


def put_pin(connection: str, tool: str, fingerprint: str, definition: dict[str, Any]) -> Callable[[sqlite3.Connection], None]:
    """The write of a first-seen tool pin, in the transaction of the event that records it."""

    def apply(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR IGNORE INTO mcp_pins VALUES (?, ?, ?, ?, ?)",
                     (connection, tool, fingerprint, time.time(), canonical_json(definition)))

    return apply


def put_grant(row: tuple) -> Callable[[sqlite3.Connection], None]:
    """The write of a grant's current state, in the transaction of the event recording it."""

    def apply(conn: sqlite3.Connection) -> None:
        conn.execute(f"INSERT OR REPLACE INTO grants VALUES ({', '.join('?' * len(GRANT_COLUMNS))})", row)

    return apply


def put_directory(email: str, subject: str, issuer: str, groups: list[str], method: str,
                  ) -> Callable[[sqlite3.Connection], None]:
    """An approver's identity as of this sign-in, in the transaction of the event recording it."""

    def apply(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO approver_directory VALUES (?, ?, ?, ?, ?, ?)",
                     (email.lower(), subject, issuer, canonical_json(groups), method, time.time()))

    return apply


class Store:
    def __init__(self, path: str, synchronous: str = "normal") -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._ensure_schema()
        cols = [c for c in COLUMNS if c != "seq"]
        self._insert = f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self._cols = cols

    def _tables(self) -> set[str]:
        return {name for (name,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _ensure_schema(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = self._tables()
        if "events" in tables and version != SCHEMA_VERSION and version not in UPGRADABLE:
            raise StoreError(
                f"{self.path}: audit store schema version {version}, but this gateway writes version "
                f"{SCHEMA_VERSION}; verify and archive the old store, then use a new store.path"
            )
        if set(TABLES) <= tables and version == SCHEMA_VERSION:
            return  # an existing store: reading it needs nothing more (and starts fast)
        import sqlite_utils  # creating the tables: its column types are the schema's contract

        db = sqlite_utils.Database(self.conn)
        self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if "events" not in tables:
            db["events"].create(COLUMNS, pk="seq", not_null={"id", "ts", "kind", "prev_hash", "hash"})
            for cols in INDEXES:
                db["events"].create_index(cols, if_not_exists=True)
            db["events"].create_index(["id"], unique=True, if_not_exists=True)
        if "chain_head" not in tables:
            db["chain_head"].create({"id": int, "seq": int, "hash": str}, pk="id")
        if "checkpoints" not in tables:
            db["checkpoints"].create(CHECKPOINT_COLUMNS, pk="seq", not_null=set(CHECKPOINT_COLUMNS))
        if "anchors" not in tables:
            db["anchors"].create(CHECKPOINT_COLUMNS, pk="seq", not_null=set(CHECKPOINT_COLUMNS))
        if "bodies" not in tables:
            db["bodies"].create(BODY_COLUMNS, pk="digest", not_null=set(BODY_COLUMNS))
        if "approvals" not in tables:
            db["approvals"].create(APPROVAL_COLUMNS, pk="id", not_null={"state", "created", "document"})
            db["approvals"].create_index(["state"], if_not_exists=True)
            db["approvals"].create_index(["fingerprint"], if_not_exists=True)
        if "mcp_pins" not in tables:
            db["mcp_pins"].create(PIN_COLUMNS, pk=("connection", "tool"), not_null=set(PIN_COLUMNS))
        if "grants" not in tables:
            db["grants"].create(GRANT_COLUMNS, pk="id", not_null={"approval", "subject", "expires", "document"})
        if "approver_directory" not in tables:
            db["approver_directory"].create(DIRECTORY_COLUMNS, pk="email", not_null=set(DIRECTORY_COLUMNS))

    def close(self) -> None:
        self.conn.close()

    def append(self, events: list[Event], apply: Callable[[sqlite3.Connection], None] | None = None) -> list[int]:
        """Chain and write `events` in one transaction; returns their sequence numbers.

        `apply`, when given, runs first in the same transaction (state that must change
        together with the events that record the change, such as an approval's state).
        """
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if apply is not None:
                apply(conn)
            seqs = self._chain(conn, events)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return seqs

    def _chain(self, conn: sqlite3.Connection, events: list[Event]) -> list[int]:
        """Inside a transaction: append `events` after the head and move the head."""
        head = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
        seq, prev = head if head else (0, GENESIS)
        seqs, rows, bodies = [], [], {}
        for event in events:
            seq += 1
            row = event.row()
            row["seq"], row["prev_hash"] = seq, prev
            row["hash"] = prev = chain_hash(prev, row)
            body = row.pop("body")
            if body is not None:
                bodies.setdefault(row["body_digest"], (len(body), *pack(body)))
            rows.append([row.get(c) for c in self._cols])
            seqs.append(seq)
        conn.executemany(self._insert, rows)
        conn.executemany("INSERT OR IGNORE INTO bodies (digest, size, encoding, data) VALUES (?, ?, ?, ?)",
                         [(d, *kept) for d, kept in bodies.items()])
        conn.execute(
            "INSERT INTO chain_head (id, seq, hash) VALUES (1, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (seq, prev),
        )
        return seqs

    def head(self) -> tuple[int, str]:
        return self._head(self.conn)

    def pins(self) -> list[dict[str, Any]]:
        """Every first-seen MCP tool pin, with its definition parsed."""
        return [{"connection": c, "tool": t, "fingerprint": fp, "definition": json.loads(d)}
                for c, t, fp, d in self.conn.execute("SELECT connection, tool, fingerprint, definition FROM mcp_pins")]

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint, oldest first, as {"document": …, "signature": …}."""
        return [{"document": json.loads(d), "signature": json.loads(s)}
                for d, s in self.conn.execute("SELECT document, signature FROM checkpoints ORDER BY seq")]

    def prune(self, before: float, sign: Callable[[dict[str, Any]], dict[str, str]],
              archive: Callable[[Iterator[dict[str, Any]], int, str], dict[str, Any]] | None) -> dict[str, Any] | None:
        """Remove the events recorded before `before` (a prefix of the chain: it stops at the
        first event at or after it), leaving a signed checkpoint of the prefix's last hash so
        the rest still verifies. The prefix is verified and handed to `archive` (which returns
        what it wrote) before anything is removed, outside the write lock so the gateway keeps
        recording meanwhile; if either fails, nothing is removed. Finished approvals last
        changed before `before` go too. The prune itself is recorded as an event. Returns the
        checkpoint document, or None when nothing is that old."""
        conn = self.conn
        previous = self._checkpoint(conn)
        start = previous["seq"] if previous else 0
        first_kept = conn.execute("SELECT MIN(seq) FROM events WHERE ts >= ?", [before]).fetchone()[0]
        upto = (first_kept - 1) if first_kept is not None else self._head(conn)[0]
        if upto <= start:
            return None
        check = self._walk(conn, upto)
        if not check.ok:
            raise StoreError(f"the chain is broken at event {check.broken_at} ({check.problem}); "
                             "nothing was pruned: keep the store as evidence")
        span = conn.execute("SELECT MIN(seq), MIN(ts), MAX(ts), COUNT(*) FROM events WHERE seq <= ?", [upto]).fetchone()
        document = {
            "seq": upto, "hash": check.head, "first_seq": span[0], "first_ts": span[1], "last_ts": span[2],
            "pruned": span[3], "before": before, "created": time.time(),
            "previous": {"seq": previous["seq"], "hash": previous["hash"]} if previous else None,
        }
        if archive is not None:
            rows = self._query(conn, "SELECT * FROM events WHERE seq > ? AND seq <= ? ORDER BY seq", [start, upto])
            document["archive"] = archive(rows, upto, check.head)
        signature = sign(document)
        conn.execute("BEGIN IMMEDIATE")
        try:
            same = conn.execute("SELECT hash FROM events WHERE seq = ?", [upto]).fetchone()
            if self._checkpoint(conn) != previous or same is None or same[0] != check.head:
                raise StoreError("the store changed while pruning (another prune?); nothing was pruned")
            conn.execute("INSERT INTO checkpoints (seq, document, signature) VALUES (?, ?, ?)",
                         [upto, canonical_json(document), canonical_json(signature)])
            conn.execute("DELETE FROM events WHERE seq <= ?", [upto])
            conn.execute("DELETE FROM anchors WHERE seq <= ?", [upto])
            conn.execute("DELETE FROM bodies WHERE digest NOT IN "
                         "(SELECT body_digest FROM events WHERE body_digest IS NOT NULL)")
            conn.execute("DELETE FROM approvals WHERE updated < ? AND state NOT IN ('pending', 'approved')", [before])
            self._chain(conn, [Event(id=new_id(), kind="prune",
                                     detail={"checkpoint": document, "key_id": signature["key_id"]})])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return document

    def checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint's document (the pruned prefix the chain now starts after)."""
        return self._checkpoint(self.conn)

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> dict[str, Any] | None:
        row = conn.execute("SELECT document FROM checkpoints ORDER BY seq DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def _head(conn: sqlite3.Connection) -> tuple[int, str]:
        row = conn.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
        return tuple(row) if row else (0, GENESIS)

    @staticmethod
    def _query(conn: sqlite3.Connection, sql: str, args: list[Any]) -> Iterator[dict[str, Any]]:
        """Rows of `sql` as dicts; an event row's `body` is filled from `bodies` when it is
        not inline (a version 1 body, or one put back by hand, is read as it is)."""
        cursor = conn.execute(sql, args)
        names = [d[0] for d in cursor.description]
        fill = "body" in names and "body_digest" in names
        for values in cursor:
            row = dict(zip(names, values))
            if fill and row["body"] is None and row["body_digest"] is not None:
                kept = conn.execute("SELECT encoding, data FROM bodies WHERE digest = ?", [row["body_digest"]]).fetchone()
                row["body"] = unpack(*kept) if kept else None
            yield row

    def verify(self, anchor: dict[str, Any] | None = None) -> Verification:
        """Walk the chain from the last checkpoint (or the start), or from `anchor` (a signed
        {seq, hash} an earlier full verification reached: its event must still have that
        hash); report the first broken link. One read transaction: a snapshot, however busy
        the writers are. Signatures are checked by the caller (it knows which key to trust)."""
        conn = self.conn
        conn.execute("BEGIN")
        try:
            return self._walk(conn, None, anchor)
        finally:
            conn.execute("COMMIT")

    def anchors(self) -> list[dict[str, Any]]:
        """Every anchor, newest first, as {"document": …, "signature": …}."""
        return [{"document": json.loads(d), "signature": json.loads(s)}
                for d, s in self.conn.execute("SELECT document, signature FROM anchors ORDER BY seq DESC")]

    def add_anchor(self, document: dict[str, Any], signature: dict[str, Any]) -> None:
        self.conn.execute("INSERT OR REPLACE INTO anchors (seq, document, signature) VALUES (?, ?, ?)",
                          [document["seq"], canonical_json(document), canonical_json(signature)])

    def _walk(self, conn: sqlite3.Connection, upto: int | None, anchor: dict[str, Any] | None = None) -> Verification:
        checkpoint = self._checkpoint(conn)
        prev, expected_seq = (checkpoint["hash"], checkpoint["seq"] + 1) if checkpoint else (GENESIS, 1)
        if anchor is not None and anchor["seq"] >= expected_seq:
            held = conn.execute("SELECT hash FROM events WHERE seq = ?", [anchor["seq"]]).fetchone()
            if held is None or held[0] != anchor["hash"]:
                return Verification(False, 0, anchor["hash"], anchor["seq"],
                                    f"event {anchor['seq']} is not the one the signed anchor names: changed or removed",
                                    first=anchor["seq"], last=anchor["seq"])
            prev, expected_seq = anchor["hash"], anchor["seq"] + 1
        first, count = expected_seq, 0
        limit = "" if upto is None else f" AND seq <= {int(upto)}"
        for row in self._query(conn, f"SELECT * FROM events WHERE seq >= ?{limit} ORDER BY seq", [first]):
            count += 1
            seq = row["seq"]
            if seq != expected_seq:
                where = " (the first after the checkpoint)" if checkpoint and expected_seq == checkpoint["seq"] + 1 else ""
                return Verification(False, count, prev, seq, f"event {expected_seq}{where} is missing (found {seq})",
                                    first=first, last=seq)
            if row["prev_hash"] != prev:
                return Verification(False, count, prev, seq, "previous-hash link does not match: an event before it "
                                    "was changed, removed or reordered", first=first, last=seq)
            if row["body"] is not None and digest(row["body"]) != row["body_digest"]:
                return Verification(False, count, prev, seq, "body does not match its digest", first=first, last=seq)
            if chain_hash(prev, row) != row["hash"]:
                return Verification(False, count, prev, seq, "event contents do not match its hash",
                                    first=first, last=seq)
            prev, expected_seq = row["hash"], seq + 1
        if upto is not None:
            return Verification(expected_seq - 1 == upto, count, prev, None if expected_seq - 1 == upto else upto,
                                "" if expected_seq - 1 == upto else f"event {upto} is missing")
        head_seq, head_hash = self._head(conn)
        if (head_seq, head_hash) != (expected_seq - 1, prev):
            return Verification(False, count, prev, expected_seq, f"chain head says {head_seq} events but the log ends "
                                f"at {expected_seq - 1}: events were removed from the end", first=first,
                                last=expected_seq - 1)
        return Verification(True, count, prev, checkpoint=checkpoint, first=first, last=expected_seq - 1)

    # Reading

    def event(self, event_id: str) -> dict[str, Any] | None:
        return next(self._query(self.conn, "SELECT * FROM events WHERE id = ?", [event_id]), None)

    def where(self, clause: str, args: list[Any], limit: int | None = None) -> list[dict[str, Any]]:
        return list(self._query(self.conn, f"SELECT * FROM events WHERE {clause} ORDER BY seq"
                                + (f" LIMIT {int(limit)}" if limit is not None else ""), args))

    def tail(self, count: int, after: int = 0) -> list[dict[str, Any]]:
        return list(self._query(
            self.conn, "SELECT * FROM (SELECT * FROM events WHERE seq > ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            [after, count]))

    def rows(self) -> Iterator[dict[str, Any]]:
        yield from self._query(self.conn, "SELECT * FROM events ORDER BY seq", [])

    def hash_at(self, seq: int) -> str | None:
        """The hash of event `seq`, or None when the store does not hold it."""
        row = self.conn.execute("SELECT hash FROM events WHERE seq = ?", [seq]).fetchone()
        return row[0] if row else None

    def sessions(self, start: float | None = None, principal: str = "", limit: int = 20) -> list[dict[str, Any]]:
        """Sessions, the latest active first: who, when, which connections, how many requests,
        denials and holds (an agent's HTTP connection, pg or ssh session, or kubectl's)."""
        clauses, args = ["session IS NOT NULL"], []
        if start is not None:
            clauses.append("ts >= ?")
            args.append(start)
        if principal:
            clauses.append("session IN (SELECT session FROM events WHERE subject = ?)")
            args.append(principal)
        cursor = self.conn.execute(
            "SELECT session, MIN(ts) AS first, MAX(ts) AS last, GROUP_CONCAT(DISTINCT subject) AS subjects, "
            "GROUP_CONCAT(DISTINCT agent) AS agents, GROUP_CONCAT(DISTINCT connection) AS connections, "
            "SUM(kind = 'request') AS requests, SUM(kind = 'decision' AND effect = 'deny') AS denied, "
            "SUM(kind = 'approval' AND json_extract(detail, '$.step') = 'requested') AS held "
            f"FROM events WHERE {' AND '.join(clauses)} GROUP BY session ORDER BY last DESC LIMIT ?", [*args, limit])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        """An approval's current document, or None."""
        row = self.conn.execute("SELECT document FROM approvals WHERE id = ?", [approval_id]).fetchone()
        return json.loads(row[0]) if row else None

    def grants(self, active_at: float | None = None) -> list[dict[str, Any]]:
        """Grant documents, newest first; with `active_at`, only those neither revoked nor
        expired then."""
        where, args = ("revoked IS NULL AND expires > ?", [active_at]) if active_at is not None else ("1", [])
        return [json.loads(d) for (d,) in self.conn.execute(
            f"SELECT document FROM grants WHERE {where} ORDER BY expires DESC", args)]

    def directory(self, email: str) -> dict[str, Any] | None:
        """The approver identity `email` had at its last SSO sign-in, or None."""
        row = self.conn.execute("SELECT subject, issuer, groups, method, signed_in FROM approver_directory "
                                "WHERE email = ?", [email.lower()]).fetchone()
        if row is None:
            return None
        return {"email": email.lower(), "subject": row[0], "issuer": row[1], "groups": json.loads(row[2]),
                "method": row[3], "signed_in": row[4]}

    def approvals(self, states: tuple[str, ...] = (), connection: str | None = None,
                  requester: str | None = None) -> Iterator[dict[str, Any]]:
        """Approval documents, newest first, in any of `states` (all when empty)."""
        clauses, args = [], []
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        for column, value in (("connection", connection), ("subject", requester)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = " AND ".join(clauses) or "1"
        for (document,) in self.conn.execute(f"SELECT document FROM approvals WHERE {where} ORDER BY created DESC", args):
            yield json.loads(document)


class Writer:
    """Appends to a Store from a thread of its own, committing in groups.

    The gateway must not forward a request before its events are on disk, and a commit per
    request is the most expensive thing the chain does. Here every append waits for its
    commit, but the commit covers everything that queued up meanwhile (group commit), and it
    happens off the event loop (sqlite releases the GIL), so other flows keep moving.
    A failed transaction fails every append in it, so each of those flows is refused.
    """

    MAX_BATCH = 256

    def __init__(self, path: str, synchronous: str = "normal") -> None:
        self.path, self.synchronous = path, synchronous
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="custody-audit-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def append(self, events: list[Event], apply: Callable[[sqlite3.Connection], None] | None = None) -> None:
        future = asyncio.get_running_loop().create_future()
        self._queue.put((events, apply, future))
        await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            store = Store(self.path, self.synchronous)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            applies = [a for _, a, _ in batch if a is not None]
            try:
                store.append(
                    [e for events, _, _ in batch for e in events],
                    (lambda conn: [a(conn) for a in applies]) if applies else None,
                )
                error = None
            except Exception as e:
                error = e
            try:
                batch[0][2].get_loop().call_soon_threadsafe(_settle, [f for _, _, f in batch], error)
            except RuntimeError:
                pass  # the event loop is gone: the gateway is shutting down
        store.close()


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for f in futures:
        if f.done():
            continue
        if error is None:
            f.set_result(None)
        else:
            f.set_exception(error)
