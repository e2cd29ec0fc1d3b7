"""The audit store: an append-only, hash-chained log of events, with the approvals' current
state, in SQLite (WAL) for one gateway or PostgreSQL (addons/engine/pgstore.py) for several.

Its schema is the contract the CLI and exporters read, through one interface (`AuditStore`)
whatever the database: `open_store(config)` picks SQLite for `store.path` and PostgreSQL
for `store.url`. Each event stores the hash of the event before it; an event's hash is
SHA-256 over the previous hash and a canonical JSON encoding of every column (the body is
covered through its digest, and `replica`, the gateway process that wrote it, since schema
version 3). `chain_head` holds the last sequence number and hash, written in the same
transaction, so removing events from the end is detected as well as editing, deleting or
reordering rows anywhere. Appends hold the database's write lock on the head (SQLite:
`BEGIN IMMEDIATE`; PostgreSQL: the head's row lock), so writers in any number of processes
or hosts never fork the chain.

An approval changes in the transaction that appends the events recording the change
(`Change`): its row is locked (the writer's transaction), its current document read, and
the change decided on that document alone, so two replicas voting at the same moment
count both votes once, in some order, and an approval is executed, expired or abandoned
exactly once.

Bodies are kept once per distinct content, deflated, in `bodies` (keyed by their SHA-256);
an event refers to its body by `body_digest`, which is what the chain covers, so where a
body is kept does not change any hash. Readers get rows with `body` filled in as before.
Stores of schema versions 1 (bodies inline), 2 (no `replica`), 3 (no grants), 4 (no tool
calls), 5 (no web sessions) and 6 (no `sink_cursors`) are upgraded in place: their events stay as they were and
still verify.

`sink_cursors` holds, for each audit sink (addons/sinks.py), the last event it has
delivered and which replica ships it until when (its lease): the cursor lives with the
log, so every replica resumes where the sink stopped, and only one ships it at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import socket
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from addons.engine.config import StoreConfig
from addons.engine.model import Decision, Operation, Principal, canonical_json, new_id, storable
from addons.engine.provenance import Asked

GENESIS = "0" * 64
SCHEMA_VERSION = 7  # bumped when tables, columns or hashing change (SQLite: PRAGMA user_version)
UPGRADABLE = (1, 2, 3, 4, 5, 6)  # upgraded in place (1: bodies inline in events; 2: no replica column; 3: no grants;
# 4: no tool calls; 5: no web sessions; 6: no sink_cursors)
LIVE_STATES = ("pending", "approved")
"""Approval states that can still change (addons/engine/approval.py LIVE)."""


class StoreError(Exception):
    """The audit store cannot be used as it is; the message says why and what to do."""


# Column name -> type. Order is the canonical order for hashing.
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
    "replica": str,
    "prev_hash": str,
    "hash": str,
}
HASHED = [c for c in COLUMNS if c not in ("hash", "body")]
LEGACY_HASHED = [c for c in HASHED if c != "replica"]
"""What the hash of an event written before schema version 3 (no replica) covers."""
INDEXES = (["session"], ["flow"], ["approval"])

# Approvals: the current state of each review (the hash chain holds every step of it).
# `replica` is the gateway replica holding the approval's flow while `held`.
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
    "replica": str,
}
# Replicas: every gateway process that used the store, its lease (heartbeat, in the
# database's clock) and what it runs (hashes of its rule set and configuration).
REPLICA_COLUMNS: dict[str, type] = {
    "id": str,
    "host": str,
    "pid": int,
    "started": float,
    "heartbeat": float,
    "state": str,
    "rules": str,
    "config": str,
    "listen": str,
}

# Sink cursors: the last event each audit sink delivered, and the replica shipping it until
# `lease_until` (the database's clock).
SINK_COLUMNS: dict[str, type] = {"sink": str, "seq": int, "owner": str, "lease_until": float}
# Checkpoints: the signed hash and extent of each pruned prefix of the chain. Anchors: the
# signed hash of an event a full verification reached, where the next one may start.
CHECKPOINT_COLUMNS: dict[str, type] = {"seq": int, "document": str, "signature": str}
# Bodies: each distinct body once, by its digest; `encoding` is "deflate" or "identity".
BODY_COLUMNS: dict[str, type] = {"digest": str, "size": int, "encoding": str, "data": bytes}
TABLES = ("events", "chain_head", "checkpoints", "anchors", "approvals", "bodies", "mcp_pins", "replicas", "grants",
          "tool_calls",
          "approver_directory", "web_sessions", "signins", "slack_seen", "sink_cursors")
COPIED = (("bodies", "digest"), ("events", "seq"), ("chain_head", "id"), ("checkpoints", "seq"),
          ("anchors", "seq"), ("approvals", "id"), ("mcp_pins", "connection, tool"), ("grants", "id"),
          ("approver_directory", "email"), ("sink_cursors", "sink"))
"""What a migration copies, table by table, in the order of its key (replicas, web sessions,
sign-ins in progress and Slack's seen requests stay behind)."""


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


# Grants: each time-boxed grant as the approval that issued it holds it (its document's
# `grant`), written with the approval's row, so requests find the active ones by principal
# and connection. Directory: the IdP identity each approver's e-mail had at their last SSO
# sign-in, which binds a Slack user to an approver.
GRANT_COLUMNS: dict[str, type] = {"id": str, "approval": str, "subject": str, "connection": str, "expires": float,
                                  "revoked": float, "document": str}
DIRECTORY_COLUMNS: dict[str, type] = {"email": str, "subject": str, "issuer": str, "groups": str, "method": str,
                                      "signed_in": float}
# Web sessions: an approver's page session by the SHA-256 of its cookie (the cookie itself is
# never stored). Sign-ins: each SSO sign-in in progress by its OIDC state or SAML request id,
# taken (deleted) once when the identity provider sends the browser back. Slack requests:
# each signed interactivity request seen, by the hash of its timestamp and signature.
# Every replica reads them, so an approver may reach any replica at any step; none is
# copied by a migration (they expire within hours) and each is swept once expired.
WEB_SESSION_COLUMNS: dict[str, type] = {"key": str, "subject": str, "principal": str, "method": str, "email": str,
                                        "csrf": str, "created": float, "expires": float}
SIGNIN_COLUMNS: dict[str, type] = {"key": str, "method": str, "document": str, "expires": float}
SLACK_SEEN_COLUMNS: dict[str, type] = {"key": str, "expires": float}

# Tool calls: what each completion asked for (addons/engine/provenance.py `Asked`), per
# principal and crew run, written with the completion's event, so a request that reaches
# another replica than its model call finds them. `position`: the call's place in its
# completion. Not copied by a migration, and pruned once expired: they matter for minutes.
TOOL_CALL_COLUMNS: dict[str, type] = {"issuer": str, "subject": str, "run": str, "event": str, "position": int,
                                      "flow": str, "connection": str, "model": str, "call": str, "tool": str,
                                      "arguments": str, "text": str, "form": str, "at": float, "expires": float}
TOOL_CALL_KEY = ("event", "position")
TOOL_CALL_INDEX = ("issuer", "subject", "run", "at")


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
        row = {
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
        return {k: storable(v) if isinstance(v, str) else v for k, v in row.items()}  # any request can be recorded


def _canonical(values: list[Any]) -> str:
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical JSON array of the hashed columns
    (an event from before schema version 3 has no replica, and its hash never covered one)."""
    columns = HASHED if row.get("replica") is not None else LEGACY_HASHED
    return hashlib.sha256((prev_hash + _canonical([row[c] for c in columns])).encode()).hexdigest()


def link_middle(row: dict[str, Any]) -> str:
    """The canonical encoding of a version 3 row's hashed columns between `seq` (the first)
    and `prev_hash` (the last): what a database that assigns seq and prev_hash under its own
    lock needs to compute chain_hash, `prev + "[" + seq + "," + middle + ",\"" + prev + "\"]"`."""
    return _canonical([row[c] for c in HASHED[1:-1]])[1:-1]


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


@dataclass(frozen=True)
class Change:
    """A change of one approval, decided inside the append's transaction, on the approval's
    current document with its row locked: `decide(document or None)` returns the new
    document (None: nothing changes) and the events recording the change. It runs on the
    writer's thread and must be pure; an exception fails this change alone."""

    approval: str
    decide: Callable[[dict[str, Any] | None], tuple[dict[str, Any] | None, list[Event]]]


@dataclass(frozen=True)
class Pin:
    """A first-seen MCP tool's definition (addons/mcpguard.py), kept in the transaction of
    the event recording it; the first pin of a tool stands."""

    connection: str
    tool: str
    fingerprint: str
    definition: dict[str, Any]

    SQL = (f"INSERT INTO mcp_pins ({', '.join(PIN_COLUMNS)}) VALUES ({', '.join('?' * len(PIN_COLUMNS))}) "
           "ON CONFLICT DO NOTHING")

    def row(self) -> tuple:
        return self.connection, self.tool, self.fingerprint, time.time(), canonical_json(self.definition)




@dataclass(frozen=True)
class Listing:
    """An approver's identity as of an SSO sign-in (addons/signin.py), kept in the
    transaction of the event recording the sign-in; the latest sign-in of an e-mail stands."""

    email: str
    subject: str
    issuer: str
    groups: tuple[str, ...]
    method: str

    SQL = (f"INSERT INTO approver_directory ({', '.join(DIRECTORY_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(DIRECTORY_COLUMNS))}) ON CONFLICT(email) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in DIRECTORY_COLUMNS if c != "email"))

    def row(self) -> tuple:
        groups = canonical_json(list(self.groups))
        return self.email.lower(), self.subject, self.issuer, groups, self.method, time.time()


@dataclass(frozen=True)
class SessionRow:
    """An approver's page session (addons/engine/websession.py), kept in the transaction of
    the event recording the sign-in: a sign-in not on record starts no session."""

    key: str
    principal: Principal
    method: str
    email: str
    csrf: str
    created: float
    expires: float

    SQL = (f"INSERT INTO web_sessions ({', '.join(WEB_SESSION_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(WEB_SESSION_COLUMNS))})")

    def row(self) -> tuple:
        return (self.key, self.principal.subject, self.principal.json, self.method, self.email, self.csrf,
                self.created, self.expires)


@dataclass(frozen=True)
class ToolCall:
    """A tool call a completion asked for (addons/modelguard.py), kept in the transaction of
    the event recording the completion, for every replica's provenance."""

    key: tuple[str, str, str]
    position: int
    asked: Asked

    SQL = (f"INSERT INTO tool_calls ({', '.join(TOOL_CALL_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(TOOL_CALL_COLUMNS))}) ON CONFLICT DO NOTHING")

    def row(self) -> tuple:
        a = self.asked
        return (*self.key, a.event, self.position, a.flow, a.connection, a.model, a.call, a.tool,
                canonical_json(a.arguments), a.text, a.form, a.at, a.expires)


def asked_from(row: dict[str, Any]) -> Asked:
    return Asked(event=row["event"], flow=row["flow"], connection=row["connection"], model=row["model"],
                 call=row["call"], tool=row["tool"], arguments=json.loads(row["arguments"]), text=row["text"],
                 form=row["form"], at=row["at"], expires=row["expires"])


Kept = Pin | Listing | ToolCall | SessionRow
"""What a write keeps beside its events, in their transaction."""


def approval_row(document: dict[str, Any]) -> list[Any]:
    """The approvals table's columns for an approval document, in APPROVAL_COLUMNS order."""
    return [document["id"], document["state"], document["created"], time.time(), document["requester"]["subject"],
            document["connection"], document["fingerprint"], int(document["held"]), document["expires"],
            canonical_json(document), document.get("replica") or None]


UPSERT_GRANT = (f"INSERT INTO grants ({', '.join(GRANT_COLUMNS)}) VALUES ({', '.join('?' * len(GRANT_COLUMNS))}) "
                "ON CONFLICT(id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in GRANT_COLUMNS if c != "id"))


def grant_row(grant: dict[str, Any]) -> list[Any]:
    """The grants table's columns for a grant document (addons/engine/grants.py), in GRANT_COLUMNS order."""
    return [grant["id"], grant["approval"], grant["principal"]["subject"], grant["shape"]["connection"],
            grant["expires"], grant["revoked"], canonical_json(grant)]


def default_replica() -> str:
    """Who writes when no gateway replica does (the CLI, a test): host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


UPSERT_APPROVAL = (f"INSERT INTO approvals ({', '.join(APPROVAL_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(APPROVAL_COLUMNS))}) ON CONFLICT(id) DO UPDATE SET "
                   + ", ".join(f"{c} = excluded.{c}" for c in APPROVAL_COLUMNS if c != "id"))
BEAT = ("INSERT INTO replicas (id, host, pid, started, heartbeat, state, rules, config, listen) "
        "VALUES (?, ?, ?, ?, {now}, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET heartbeat = excluded.heartbeat, "
        "state = excluded.state, rules = excluded.rules, config = excluded.config, listen = excluded.listen")
EVENTS = ("SELECT events.*, bodies.encoding AS kept_encoding, bodies.data AS kept_data FROM {source} "
          "LEFT JOIN bodies ON events.body IS NULL AND bodies.digest = events.body_digest")
"""Events with their kept body beside them (filled in by `_filled`)."""


class Tx:
    """A connection inside one transaction (or one read), as the generic code uses it; SQL
    is written in SQLite's dialect with `?` placeholders (PgTx translates)."""

    def rows(self, sql: str, args: Sequence[Any] = (), stream: bool = False) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        raise NotImplementedError

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        raise NotImplementedError

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None:
        raise NotImplementedError


def _filled(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Event rows with `body` filled from `bodies` when it is not inline (a version 1 body,
    or one put back by hand, is read as it is)."""
    for row in rows:
        encoding, data = row.pop("kept_encoding"), row.pop("kept_data")
        if row["body"] is None and data is not None:
            row["body"] = unpack(encoding, bytes(data))
        yield row


class AuditStore:
    """What the CLI, the exporters, the report and the gateway read and write, whatever the
    database. Subclasses provide the connection (`_read`, `_write`) and what differs
    between dialects (`_save`, `_lock`, `NOW`, `SESSIONS`)."""

    location: str
    """Where the store is, for messages: a path, or a URL without its password."""
    replica: str = ""
    NOW = ""
    """The database's clock, as SQL (seconds since the epoch)."""
    LOCK_HEAD = ""
    """Inside `_write`: take the chain head's lock, when `_write` alone does not (a prune,
    a migration: nothing may append meanwhile)."""
    SESSIONS = ""
    """The aggregate columns of `sessions()` in this dialect."""

    # connections and dialect

    @contextmanager
    def _read(self, snapshot: bool = False) -> Iterator[Tx]:
        raise NotImplementedError
        yield  # pragma: no cover

    @contextmanager
    def _write(self, single: bool = False) -> Iterator[Tx]:
        """A write transaction holding the chain's lock. `single`: the body issues one
        statement, which PostgreSQL then runs on its own (atomically, one round trip)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def _save(self, tx: Tx, events: list[Event], approvals: list[dict[str, Any]]) -> None:
        """Inside `_write`: store the approvals' new documents (telling the other replicas
        they changed) and chain the events after the head."""
        raise NotImplementedError

    def _lock(self, tx: Tx, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Inside `_write`: lock these approvals' rows and read their documents."""
        raise NotImplementedError

    def patience(self, seconds: float) -> None:
        """How long a write waits for another writer's lock before it fails. The writer
        shortens it while the store is failing (a lock held elsewhere, a full disk), so each
        refusal is fast instead of waiting out the whole timeout again; PostgreSQL's
        failures (a connection refused or broken) are fast already."""

    def listen(self, changed: Callable[[str | None], None]) -> Callable[[], None] | None:
        """Call `changed(approval id)` when any replica changes an approval, and
        `changed(None)` after a gap in which changes may have been missed; returns how to
        stop. None: this store cannot push changes (they are found by polling)."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    # writing

    def _prepared(self, events: list[Event]) -> tuple[list[dict[str, Any]], dict[str, tuple]]:
        """Rows of `events` as written by this replica (without seq and hashes), and their
        bodies by digest, each once, as kept."""
        rows, bodies = [], {}
        for event in events:
            row = event.row()
            row["replica"] = self.replica
            body = row.pop("body")
            if body is not None:
                bodies.setdefault(row["body_digest"], (len(body), *pack(body)))
            row["body"] = None
            rows.append(row)
        return rows, bodies

    def append(self, events: list[Event]) -> None:
        """Chain and write `events` in one transaction."""
        self.commit([(events, None)])

    def commit(self, batch: list[tuple[list[Event], Change | None]], kept: Sequence[Kept] = ()) -> list[Any]:
        """Write a batch in one transaction: each item's events, each change decided under
        its approval's row lock (locked in id order, so two writers never deadlock) with the
        grant its document holds, and `kept`. Returns, per item, None, the approval's document after its change, or the
        exception its decision raised (that item alone then writes nothing)."""
        ids = sorted({change.approval for _, change in batch if change is not None})
        outcomes: list[Any] = []
        with self._write(single=not ids) as tx:
            current = self._lock(tx, ids) if ids else {}
            events: list[Event] = []
            changed: dict[str, dict[str, Any]] = {}
            for item_events, change in batch:
                if change is None:
                    events += item_events
                    outcomes.append(None)
                    continue
                try:
                    document, recorded = change.decide(current.get(change.approval))
                except Exception as e:
                    outcomes.append(e)
                    continue
                if document is not None:
                    current[change.approval] = changed[change.approval] = document
                events += item_events + recorded
                outcomes.append(current.get(change.approval))
            if events or changed:
                self._save(tx, events, list(changed.values()))
            grants = [grant_row(d["grant"]) for d in changed.values() if d.get("grant")]
            if grants:
                tx.many(UPSERT_GRANT, grants)
            for sql in dict.fromkeys(k.SQL for k in kept):
                tx.many(sql, [k.row() for k in kept if k.SQL == sql])
        return outcomes

    def prune(self, before: float, sign: Callable[[dict[str, Any]], dict[str, str]],
              archive: Callable[[Iterator[dict[str, Any]], int, str], dict[str, Any]] | None,
              keep_after: int | None = None) -> dict[str, Any] | None:
        """Remove the events recorded before `before` (a prefix of the chain: it stops at the
        first event at or after it, and never goes past event `keep_after`: what the audit
        sinks have not delivered yet stays), leaving a signed checkpoint of the prefix's last hash so
        the rest still verifies. The prefix is verified and handed to `archive` (which returns
        what it wrote) before anything is removed, outside the write lock so the gateway keeps
        recording meanwhile; if either fails, nothing is removed. Finished approvals last
        changed before `before` go too. The prune itself is recorded as an event. Returns the
        checkpoint document, or None when nothing is that old."""
        with self._read(snapshot=True) as tx:
            previous = self._checkpoint(tx)
            start = previous["seq"] if previous else 0
            first_kept = tx.one("SELECT MIN(seq) FROM events WHERE ts >= ?", [before])[0]
            upto = (first_kept - 1) if first_kept is not None else self._head(tx)[0]
            if keep_after is not None:
                upto = min(upto, keep_after)
            if upto <= start:
                return None
            check = self._walk(tx, upto)
            if not check.ok:
                raise StoreError(f"the chain is broken at event {check.broken_at} ({check.problem}); "
                                 "nothing was pruned: keep the store as evidence")
            span = tx.one("SELECT MIN(seq), MIN(ts), MAX(ts), COUNT(*) FROM events WHERE seq <= ?", [upto])
            document = {
                "seq": upto, "hash": check.head, "first_seq": span[0], "first_ts": span[1], "last_ts": span[2],
                "pruned": span[3], "before": before, "created": time.time(),
                "previous": {"seq": previous["seq"], "hash": previous["hash"]} if previous else None,
            }
            if archive is not None:
                rows = _filled(tx.rows(EVENTS.format(source="events") + " WHERE seq > ? AND seq <= ? ORDER BY seq",
                                       [start, upto], stream=True))
                document["archive"] = archive(rows, upto, check.head)
        signature = sign(document)
        with self._write() as tx:
            if self.LOCK_HEAD:
                tx.one(self.LOCK_HEAD)
            same = tx.one("SELECT hash FROM events WHERE seq = ?", [upto])
            if self._checkpoint(tx) != previous or same is None or same[0] != check.head:
                raise StoreError("the store changed while pruning (another prune?); nothing was pruned")
            tx.run("INSERT INTO checkpoints (seq, document, signature) VALUES (?, ?, ?)",
                   [upto, canonical_json(document), canonical_json(signature)])
            tx.run("DELETE FROM events WHERE seq <= ?", [upto])
            tx.run("DELETE FROM anchors WHERE seq <= ?", [upto])
            tx.run("DELETE FROM bodies WHERE digest NOT IN "
                   "(SELECT body_digest FROM events WHERE body_digest IS NOT NULL)")
            self._save(tx, [Event(id=new_id(), kind="prune",
                                  detail={"checkpoint": document, "key_id": signature["key_id"]})], [])
        with self._write() as tx:  # apart: approvals are locked before the head, never while it is held
            tx.run("DELETE FROM approvals WHERE updated < ? AND state NOT IN ('pending', 'approved')", [before])
            tx.run("DELETE FROM tool_calls WHERE expires < ?", [before])
        return document

    def add_anchor(self, document: dict[str, Any], signature: dict[str, Any]) -> None:
        with self._write() as tx:
            tx.run("INSERT INTO anchors (seq, document, signature) VALUES (?, ?, ?) ON CONFLICT(seq) DO UPDATE "
                   "SET document = excluded.document, signature = excluded.signature",
                   [document["seq"], canonical_json(document), canonical_json(signature)])

    def copy_into(self, target: AuditStore) -> int:
        """Copy everything this store holds but its replicas into `target`, which must hold
        nothing yet, row for row (hashes, sequence numbers and bodies as they are), in one
        transaction of the target. Returns the number of events copied."""
        with target._read() as tx:
            if tx.one("SELECT COUNT(*) FROM events")[0] or tx.one("SELECT COUNT(*) FROM checkpoints")[0]:
                raise StoreError(f"{target.location} already holds an audit log: migrate into an empty store")
        copied = 0
        with self._read(snapshot=True) as source, target._write() as tx:
            if target.LOCK_HEAD:
                tx.one(target.LOCK_HEAD)
            tx.run("DELETE FROM chain_head")
            for table, key in COPIED:
                batch: list[dict[str, Any]] = []
                for row in source.rows(f"SELECT * FROM {table} ORDER BY {key}", stream=True):
                    batch.append(row)
                    if len(batch) == 1000:
                        _insert_rows(tx, table, batch)
                        batch = []
                _insert_rows(tx, table, batch)
            copied = source.one("SELECT COUNT(*) FROM events")[0]
        return copied

    # replicas

    def beat(self, replica: dict[str, Any]) -> None:
        """Renew a replica's lease (its heartbeat, in the database's clock) and say what it runs."""
        with self._write() as tx:
            tx.run(BEAT.format(now=self.NOW), [replica.get(c) for c in REPLICA_COLUMNS if c != "heartbeat"])
            tx.run(f"DELETE FROM replicas WHERE heartbeat < {self.NOW} - 86400")

    def replicas(self) -> list[dict[str, Any]]:
        """Every replica with a row, oldest first, with `age`: seconds since its heartbeat."""
        with self._read() as tx:
            return list(tx.rows(f"SELECT *, {self.NOW} - heartbeat AS age FROM replicas ORDER BY started"))

    def held_elsewhere(self, replica: str) -> list[dict[str, Any]]:
        """Live approvals whose flow another replica (or a process from before replicas were
        recorded) holds, with that replica's row: who may have lost them."""
        with self._read() as tx:
            return list(tx.rows(
                f"SELECT approvals.id AS approval, approvals.replica AS replica, replicas.host AS host, "
                f"replicas.pid AS pid, replicas.state AS state, {self.NOW} - replicas.heartbeat AS age "
                "FROM approvals LEFT JOIN replicas ON replicas.id = approvals.replica "
                "WHERE approvals.held = 1 AND approvals.state IN ('pending', 'approved') "
                "AND (approvals.replica IS NULL OR approvals.replica != ?)", [replica]))

    # reconciling after a crash (addons/engine/reconcile.py)

    def open_flows(self, replica: str, outcomes: Sequence[str]) -> list[dict[str, Any]]:
        """The requests `replica` recorded with their decision and no outcome (`outcomes`:
        the kinds that close a flow), in order."""
        marks = ", ".join("?" * len(outcomes))
        return list(self._events(
            "events.kind = 'request' AND events.replica = ? AND EXISTS (SELECT 1 FROM events d WHERE "
            "d.flow = events.flow AND d.kind = 'decision') AND NOT EXISTS (SELECT 1 FROM events o WHERE "
            f"o.flow = events.flow AND o.kind IN ({marks}))", [replica, *outcomes], "ORDER BY seq"))

    def transaction_responses(self, replica: str) -> list[dict[str, Any]]:
        """Every response `replica` recorded in the sessions where it recorded a SQL
        transaction's id (`detail.transaction`), in order."""
        return self.where(
            "kind = 'response' AND replica = ? AND session IN (SELECT session FROM events WHERE kind = 'response' "
            "AND replica = ? AND json_extract(detail, '$.transaction.xid') IS NOT NULL)", [replica, replica])

    def reconcile(self, replica: str, events: list[Event]) -> bool:
        """Write `events` for a replica that is gone and mark its row reconciled, in one
        transaction; False (nothing written) when another replica did it first."""
        with self._write() as tx:
            if not tx.run("UPDATE replicas SET state = 'reconciled' WHERE id = ? AND state != 'reconciled'", [replica]):
                return False
            self._save(tx, events, [])
        return True

    # audit sinks

    def claim_sink(self, sink: str, owner: str, lease: float) -> int | None:
        """Ship `sink` as `owner` for `lease` seconds more: the sequence number of the last
        event it delivered, or None while another replica's lease on it runs."""
        with self._write() as tx:
            tx.run("INSERT INTO sink_cursors (sink, seq, owner, lease_until) VALUES (?, 0, '', 0) "
                   "ON CONFLICT (sink) DO NOTHING", [sink])
            if not tx.run(f"UPDATE sink_cursors SET owner = ?, lease_until = {self.NOW} + ? "
                          f"WHERE sink = ? AND (owner = ? OR lease_until < {self.NOW})", [owner, lease, sink, owner]):
                return None
            return tx.one("SELECT seq FROM sink_cursors WHERE sink = ?", [sink])[0]

    def advance_sink(self, sink: str, owner: str, seq: int) -> bool:
        """`sink` delivered everything up to event `seq`; False if `owner` lost its lease."""
        with self._write() as tx:
            return bool(tx.run("UPDATE sink_cursors SET seq = ? WHERE sink = ? AND owner = ? AND seq < ?",
                               [seq, sink, owner, seq]))

    def release_sinks(self, owner: str) -> None:
        """`owner` stops shipping: its leases end now, so another replica takes over at once."""
        with self._write() as tx:
            tx.run("UPDATE sink_cursors SET lease_until = 0 WHERE owner = ?", [owner])

    def sink_cursors(self) -> dict[str, int]:
        """Every sink's cursor: the last event it delivered."""
        with self._read() as tx:
            return {r["sink"]: r["seq"] for r in tx.rows("SELECT sink, seq FROM sink_cursors")}

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """At most `limit` events after event `seq`, in order."""
        return list(self._events("seq > ?", [seq], f"ORDER BY seq LIMIT {int(limit)}"))

    # reading

    def head(self) -> tuple[int, str]:
        with self._read() as tx:
            return self._head(tx)

    @staticmethod
    def _head(tx: Tx) -> tuple[int, str]:
        row = tx.one("SELECT seq, hash FROM chain_head WHERE id = 1")
        return (row[0], row[1]) if row else (0, GENESIS)

    def pins(self) -> list[dict[str, Any]]:
        """Every first-seen MCP tool pin, with its definition parsed."""
        with self._read() as tx:
            return [{**r, "definition": json.loads(r["definition"])}
                    for r in tx.rows("SELECT connection, tool, fingerprint, definition FROM mcp_pins")]

    def tool_calls(self, key: tuple[str, str, str], limit: int) -> list[Asked]:
        """The `limit` newest tool calls kept for a principal and run (whichever replica saw
        the completion), newest first, expired or not (provenance.current tells)."""
        with self._read() as tx:
            return [asked_from(r) for r in tx.rows(
                f"SELECT {', '.join(TOOL_CALL_COLUMNS)} FROM tool_calls WHERE issuer = ? AND subject = ? AND run = ? "
                "ORDER BY at DESC, position DESC LIMIT ?", [*key, limit])]

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every checkpoint, oldest first, as {"document": …, "signature": …}."""
        with self._read() as tx:
            return [{"document": json.loads(r["document"]), "signature": json.loads(r["signature"])}
                    for r in tx.rows("SELECT document, signature FROM checkpoints ORDER BY seq")]

    def checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint's document (the pruned prefix the chain now starts after)."""
        with self._read() as tx:
            return self._checkpoint(tx)

    @staticmethod
    def _checkpoint(tx: Tx) -> dict[str, Any] | None:
        row = tx.one("SELECT document FROM checkpoints ORDER BY seq DESC LIMIT 1")
        return json.loads(row[0]) if row else None

    def anchors(self) -> list[dict[str, Any]]:
        """Every anchor, newest first, as {"document": …, "signature": …}."""
        with self._read() as tx:
            return [{"document": json.loads(r["document"]), "signature": json.loads(r["signature"])}
                    for r in tx.rows("SELECT document, signature FROM anchors ORDER BY seq DESC")]

    def verify(self, anchor: dict[str, Any] | None = None) -> Verification:
        """Walk the chain from the last checkpoint (or the start), or from `anchor` (a signed
        {seq, hash} an earlier full verification reached: its event must still have that
        hash); report the first broken link. One read transaction: a snapshot, however busy
        the writers are. Signatures are checked by the caller (it knows which key to trust)."""
        with self._read(snapshot=True) as tx:
            return self._walk(tx, None, anchor)

    def _walk(self, tx: Tx, upto: int | None, anchor: dict[str, Any] | None = None) -> Verification:
        checkpoint = self._checkpoint(tx)
        prev, expected_seq = (checkpoint["hash"], checkpoint["seq"] + 1) if checkpoint else (GENESIS, 1)
        if anchor is not None and anchor["seq"] >= expected_seq:
            held = tx.one("SELECT hash FROM events WHERE seq = ?", [anchor["seq"]])
            if held is None or held[0] != anchor["hash"]:
                return Verification(False, 0, anchor["hash"], anchor["seq"],
                                    f"event {anchor['seq']} is not the one the signed anchor names: changed or removed",
                                    first=anchor["seq"], last=anchor["seq"])
            prev, expected_seq = anchor["hash"], anchor["seq"] + 1
        first, count = expected_seq, 0
        limit = "" if upto is None else f" AND seq <= {int(upto)}"
        for row in _filled(tx.rows(EVENTS.format(source="events") + f" WHERE seq >= ?{limit} ORDER BY seq",
                                   [first], stream=True)):
            count += 1
            seq = row["seq"]
            if seq != expected_seq:
                first_after = checkpoint and expected_seq == checkpoint["seq"] + 1
                where = " (the first after the checkpoint)" if first_after else ""
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
        head_seq, head_hash = self._head(tx)
        if (head_seq, head_hash) != (expected_seq - 1, prev):
            return Verification(False, count, prev, expected_seq, f"chain head says {head_seq} events but the log ends "
                                f"at {expected_seq - 1}: events were removed from the end", first=first,
                                last=expected_seq - 1)
        return Verification(True, count, prev, checkpoint=checkpoint, first=first, last=expected_seq - 1)

    def _events(self, where: str, args: Sequence[Any], tail: str = "", source: str = "events",
                stream: bool = False) -> Iterator[dict[str, Any]]:
        with self._read() as tx:
            yield from _filled(tx.rows(f"{EVENTS.format(source=source)} WHERE {where} {tail}", args, stream))

    def event(self, event_id: str) -> dict[str, Any] | None:
        return next(self._events("events.id = ?", [event_id]), None)

    def where(self, clause: str, args: list[Any], limit: int | None = None) -> list[dict[str, Any]]:
        """Events matching `clause` (SQL over the event columns, `?` placeholders), in order."""
        clause = "TRUE" if clause.strip() == "1" else clause
        tail = "ORDER BY seq" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return list(self._events(f"({clause})", args, tail))

    def tail(self, count: int, after: int = 0) -> list[dict[str, Any]]:
        return list(self._events("TRUE", [after, count], "ORDER BY seq",
                                 "(SELECT * FROM events WHERE seq > ? ORDER BY seq DESC LIMIT ?) AS events"))

    def rows(self) -> Iterator[dict[str, Any]]:
        yield from self._events("TRUE", [], "ORDER BY seq", stream=True)

    def hash_at(self, seq: int) -> str | None:
        """The hash of event `seq`, or None when the store does not hold it."""
        with self._read() as tx:
            row = tx.one("SELECT hash FROM events WHERE seq = ?", [seq])
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
        with self._read() as tx:
            return list(tx.rows(f"SELECT session, MIN(ts) AS first, MAX(ts) AS last, {self.SESSIONS} "
                                f"FROM events WHERE {' AND '.join(clauses)} "
                                "GROUP BY session ORDER BY last DESC LIMIT ?",
                                [*args, limit]))

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        """An approval's current document, or None."""
        with self._read() as tx:
            row = tx.one("SELECT document FROM approvals WHERE id = ?", [approval_id])
        return json.loads(row[0]) if row else None

    def approvals(self, states: tuple[str, ...] = (), connection: str | None = None,
                  requester: str | None = None, fingerprint: str | None = None,
                  expired_by: float | None = None, ids: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
        """Approval documents, newest first, in any of `states` (all when empty), and with
        the given connection, requester, fingerprint or ids, or expired by a time."""
        clauses, args = [], []
        for column, values in (("state", states), ("id", ids)):
            if values:
                clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        for column, value in (("connection", connection), ("subject", requester), ("fingerprint", fingerprint)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        if expired_by is not None:
            clauses.append("expires <= ?")
            args.append(expired_by)
        with self._read() as tx:
            documents = [r["document"] for r in tx.rows(
                f"SELECT document FROM approvals WHERE {' AND '.join(clauses) or 'TRUE'} ORDER BY created DESC", args)]
        for document in documents:
            yield json.loads(document)

    def updated_since(self, since: float) -> list[tuple[str, float]]:
        """(id, updated) of the approvals written after `since`."""
        with self._read() as tx:
            return [(r["id"], r["updated"]) for r in tx.rows("SELECT id, updated FROM approvals WHERE updated > ?",
                                                             [since])]

    def grants(self, active_at: float | None = None, subject: str = "", connection: str = "",
               ids: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Grant documents, the latest to expire first; with `active_at`, only those neither
        revoked nor expired then; with `subject`, `connection` or `ids`, only those."""
        clauses, args = [], []
        if active_at is not None:
            clauses.append("revoked IS NULL AND expires > ?")
            args.append(active_at)
        for column, value in (("subject", subject), ("connection", connection)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        if ids:
            clauses.append(f"id IN ({', '.join('?' * len(ids))})")
            args.extend(ids)
        with self._read() as tx:
            return [json.loads(r["document"]) for r in tx.rows(
                f"SELECT document FROM grants WHERE {' AND '.join(clauses) or 'TRUE'} ORDER BY expires DESC", args)]

    def directory(self, email: str) -> dict[str, Any] | None:
        """The approver identity `email` had at its last SSO sign-in, or None."""
        with self._read() as tx:
            row = tx.one("SELECT subject, issuer, groups, method, signed_in FROM approver_directory WHERE email = ?",
                         [email.lower()])
        if row is None:
            return None
        return {"email": email.lower(), "subject": row[0], "issuer": row[1], "groups": json.loads(row[2]),
                "method": row[3], "signed_in": row[4]}

    # what approvers' sign-ins share between replicas

    def web_session(self, key: str) -> dict[str, Any] | None:
        """The session whose cookie hashes to `key` (expired, until swept), or None (unknown, signed out)."""
        with self._read() as tx:
            found = list(tx.rows("SELECT * FROM web_sessions WHERE key = ?", [key]))
        if not found:
            return None
        return {**found[0], "principal": json.loads(found[0]["principal"])}

    def end_web_session(self, key: str) -> None:
        """Sign out: the session is gone for every replica."""
        with self._write(single=True) as tx:
            tx.run("DELETE FROM web_sessions WHERE key = ?", [key])

    def begin_signin(self, key: str, method: str, document: dict[str, Any], expires: float) -> None:
        """Keep a sign-in in progress (and sweep the sessions and sign-ins that expired)."""
        with self._write() as tx:
            for table in ("web_sessions", "signins"):
                tx.run(f"DELETE FROM {table} WHERE expires <= ?", [time.time()])
            tx.run(f"INSERT INTO signins ({', '.join(SIGNIN_COLUMNS)}) VALUES (?, ?, ?, ?)",
                   [key, method, canonical_json(document), expires])

    def peek_signin(self, key: str, method: str, now: float) -> dict[str, Any] | None:
        """A sign-in in progress, left in place (SAML checks the response before taking it)."""
        with self._read() as tx:
            row = tx.one("SELECT document FROM signins WHERE key = ? AND method = ? AND expires > ?", [key, method, now])
        return None if row is None else json.loads(row[0])

    def take_signin(self, key: str, method: str, now: float) -> dict[str, Any] | None:
        """The sign-in in progress `key` names, removed in the same statement: of two
        replicas sent the same callback, one gets it and the other None."""
        with self._write(single=True) as tx:
            found = list(tx.rows("DELETE FROM signins WHERE key = ? AND method = ? RETURNING document, expires",
                                 [key, method]))
        if not found or found[0]["expires"] <= now:
            return None
        return json.loads(found[0]["document"])

    def first_seen(self, key: str, expires: float) -> bool:
        """Note a signed Slack request; False when any replica noted it already (a replay)."""
        with self._write() as tx:
            tx.run("DELETE FROM slack_seen WHERE expires <= ?", [time.time()])
            return tx.run("INSERT INTO slack_seen (key, expires) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                          [key, expires]) == 1


def _insert_rows(tx: Tx, table: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        names = list(rows[0])
        tx.many(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [[r[n] for n in names] for r in rows])


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, args: Sequence[Any] = (), stream: bool = False) -> Iterator[dict[str, Any]]:
        cursor = self.conn.execute(sql, args)
        names = [d[0] for d in cursor.description]
        for values in cursor:
            yield dict(zip(names, values))

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        return self.conn.execute(sql, args).fetchone()

    def run(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self.conn.execute(sql, args).rowcount

    def many(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)


class Store(AuditStore):
    """The embedded store: one SQLite file in WAL mode (one gateway, or its workers on one host)."""

    NOW = "((julianday('now') - 2440587.5) * 86400.0)"
    SESSIONS = ("GROUP_CONCAT(DISTINCT subject) AS subjects, GROUP_CONCAT(DISTINCT agent) AS agents, "
                "GROUP_CONCAT(DISTINCT connection) AS connections, SUM(kind = 'request') AS requests, "
                "SUM(kind = 'decision' AND effect = 'deny') AS denied, "
                "SUM(kind = 'approval' AND json_extract(detail, '$.step') = 'requested') AS held")

    def __init__(self, path: str, synchronous: str = "normal", replica: str = "", timeout: float = 5.0) -> None:
        self.path = self.location = path
        self.replica = replica or default_replica()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.patience(timeout)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._ensure_schema()
        cols = list(COLUMNS)  # seq too: after a prune of the whole log, the rowid SQLite picks would restart at 1
        self._insert = f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self._cols = cols

    def patience(self, seconds: float) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {round(seconds * 1000)}")

    def _tables(self) -> set[str]:
        return {name for (name,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _ensure_schema(self) -> None:
        if self._current():
            return  # an existing store: reading it needs nothing more (and starts fast)
        self.conn.execute("BEGIN IMMEDIATE")  # another process may be creating or upgrading it too
        try:
            if not self._current():
                self._create()
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _current(self) -> bool:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = self._tables()
        if "events" in tables and version != SCHEMA_VERSION and version not in UPGRADABLE:
            raise StoreError(
                f"{self.path}: audit store schema version {version}, but this gateway writes version "
                f"{SCHEMA_VERSION}; verify and archive the old store, then use a new store.path"
            )
        return set(TABLES) <= tables and version == SCHEMA_VERSION

    def _create(self) -> None:
        """Create what is missing, and upgrade a version 1 or 2 store in place."""
        import sqlite_utils  # creating the tables: its column types are the schema's contract

        db = sqlite_utils.Database(self.conn)
        tables = self._tables()
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
        if "replicas" not in tables:
            db["replicas"].create(REPLICA_COLUMNS, pk="id")
        if "grants" not in tables:
            db["grants"].create(GRANT_COLUMNS, pk="id", not_null={"approval", "subject", "expires", "document"})
            db["grants"].create_index(["subject", "connection"], if_not_exists=True)
        if "approver_directory" not in tables:
            db["approver_directory"].create(DIRECTORY_COLUMNS, pk="email", not_null=set(DIRECTORY_COLUMNS))
        if "tool_calls" not in tables:  # version 5
            db["tool_calls"].create(TOOL_CALL_COLUMNS, pk=TOOL_CALL_KEY, not_null=set(TOOL_CALL_COLUMNS))
            db["tool_calls"].create_index(list(TOOL_CALL_INDEX), if_not_exists=True)
        for table, columns in (("web_sessions", WEB_SESSION_COLUMNS), ("signins", SIGNIN_COLUMNS),
                               ("slack_seen", SLACK_SEEN_COLUMNS)):  # version 6
            if table not in tables:
                db[table].create(columns, pk="key", not_null=set(columns))
                db[table].create_index(["expires"], if_not_exists=True)
        db["approvals"].create_index(["updated"], if_not_exists=True)  # version 3: the inbox's news
        if "sink_cursors" not in tables:  # versions 1 to 6
            db["sink_cursors"].create(SINK_COLUMNS, pk="sink", not_null=set(SINK_COLUMNS))
        for table in ("events", "approvals"):
            if "replica" not in db[table].columns_dict:  # versions 1 and 2
                self.conn.execute(f"ALTER TABLE {table} ADD COLUMN replica TEXT")
        self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _read(self, snapshot: bool = False) -> Iterator[Tx]:
        if not snapshot:
            yield SqliteTx(self.conn)
            return
        self.conn.execute("BEGIN")
        try:
            yield SqliteTx(self.conn)
        finally:
            self.conn.execute("COMMIT")

    @contextmanager
    def _write(self, single: bool = False) -> Iterator[Tx]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield SqliteTx(self.conn)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _lock(self, tx: Tx, ids: list[str]) -> dict[str, dict[str, Any]]:
        """BEGIN IMMEDIATE holds the whole database: reading the documents is enough."""
        return {r["id"]: json.loads(r["document"]) for r in tx.rows(
            f"SELECT id, document FROM approvals WHERE id IN ({', '.join('?' * len(ids))})", ids)}

    def _save(self, tx: Tx, events: list[Event], approvals: list[dict[str, Any]]) -> None:
        if approvals:
            tx.many(UPSERT_APPROVAL, [approval_row(d) for d in approvals])
        if events:
            self._chain(tx, events)

    def _chain(self, tx: Tx, events: list[Event]) -> list[int]:
        """Inside a transaction: append `events` after the head and move the head."""
        seq, prev = self._head(tx)
        rows, bodies = self._prepared(events)
        seqs, values = [], []
        for row in rows:
            seq += 1
            row["seq"], row["prev_hash"] = seq, prev
            row["hash"] = prev = chain_hash(prev, row)
            values.append([row.get(c) for c in self._cols])
            seqs.append(seq)
        tx.many(self._insert, values)
        tx.many("INSERT INTO bodies (digest, size, encoding, data) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(d, *kept) for d, kept in bodies.items()])
        tx.run("INSERT INTO chain_head (id, seq, hash) VALUES (1, ?, ?) "
               "ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash", (seq, prev))
        return seqs


def resolve(settings: StoreConfig) -> str:
    """The store's PostgreSQL URL with its password, resolved from their references."""
    from pathlib import Path

    from addons.engine.config import resolve_secret

    url, base = settings.url, Path(settings.base)
    if url.startswith(("env:", "file:")):
        url = resolve_secret(url, base)
    if settings.password:
        from psycopg.conninfo import make_conninfo

        url = make_conninfo(url, password=resolve_secret(settings.password, base))
    return url


def open_store(settings: StoreConfig, replica: str = "", *, writer: bool = False) -> AuditStore:
    """The store the configuration names: SQLite at `store.path`, PostgreSQL at `store.url`.
    `writer`: for the one thread that appends (PostgreSQL: its own connection, not the pool)."""
    if not settings.url:
        return Store(settings.path, settings.synchronous, replica, settings.timeout)
    from addons.engine.pgstore import PgStore

    try:
        url = resolve(settings)
    except (OSError, ValueError) as e:
        raise StoreError(f"store: {e}") from None
    return PgStore(url, replica, dedicated=writer, pool_size=settings.pool, timeout=settings.timeout)


def open_location(location: str, synchronous: str = "normal") -> AuditStore:
    """A store named on the command line: a postgresql:// URL or a SQLite path."""
    if location.startswith(("postgresql://", "postgres://")):
        from addons.engine.pgstore import PgStore

        return PgStore(location)
    return Store(location, synchronous)


class Writer:
    """Appends to a store from a thread of its own, committing in groups.

    The gateway must not forward a request before its events are on disk, and a commit per
    request is the most expensive thing the chain does. Here every append waits for its
    commit, but the commit covers everything that queued up meanwhile (group commit), and it
    happens off the event loop (sqlite and psycopg release the GIL), so other flows keep
    moving. A failed transaction fails every append in it, so each of those flows is refused.
    """

    MAX_BATCH = 256
    HURRIED = 0.25
    """Seconds a commit waits for a lock while the store is failing (`AuditStore.patience`)."""

    def __init__(self, open: Callable[[], AuditStore],
                 outcome: Callable[[BaseException | None], None] | None = None, patience: float = 5.0) -> None:
        self._open = open
        self._patience = patience
        self._outcome = outcome or (lambda error: None)
        """Told after every commit whether the store took it (None) or why not."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="custody-audit-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def append(self, events: list[Event], kept: Sequence[Kept] = ()) -> None:
        """Append `events` (and keep `kept` in the same transaction)."""
        await self._submit(events, None, kept)

    async def change(self, change: Change, events: list[Event] = ()) -> dict[str, Any] | None:
        """Apply `change` (with `events`); the approval's document after it."""
        return await self._submit(list(events), change)

    async def _submit(self, events: list[Event], change: Change | None, kept: Sequence[Kept] = ()) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.put((events, change, kept, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            store = self._open()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        failing = False
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
            try:
                outcomes = store.commit([(events, change) for events, change, _, _ in batch],
                                        [k for _, _, kept, _ in batch for k in kept])
                if failing:
                    store.patience(self._patience)
                failing = False
                self._outcome(None)
            except Exception as e:
                outcomes = [e] * len(batch)
                if not failing:
                    store.patience(self.HURRIED)
                failing = True
                self._outcome(e)
            try:
                batch[0][3].get_loop().call_soon_threadsafe(_settle, [f for *_, f in batch], outcomes)
            except RuntimeError:
                pass  # the event loop is gone: the gateway is shutting down
        store.close()


def _settle(futures: list[asyncio.Future], outcomes: list[Any]) -> None:
    for f, outcome in zip(futures, outcomes):
        if f.done():
            continue
        if isinstance(outcome, BaseException):
            f.set_exception(outcome)
        else:
            f.set_result(outcome)
