"""What the gateway remembers about MCP servers and their sessions: who opened each session,
which requests are waiting for answers that may come on another stream, which of the
server's requests it passed on to the client, and the pinned definition of each tool.

Plain data (no mitmproxy); the chain's MCP addon (addons/mcpguard.py) owns one of each.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from addons.engine import mcp
from addons.engine.config import Connection
from addons.engine.model import Operation, Principal

MAX_SESSIONS = 100_000
MAX_WAITING = 1000  # per session: requests and server requests remembered at once


def owner(principal: Principal) -> tuple[str, str]:
    return principal.issuer, principal.subject


class Bounded(OrderedDict):
    """A dict that forgets its oldest entries past `limit` (a client that never answers)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class Session:
    """One MCP session, bound to the principal whose initialize created it."""

    connection: str
    id: str
    owner: tuple[str, str]
    endpoint: str = ""
    """The older HTTP+SSE transport: the message endpoint (path and query) the server named."""
    asked: Bounded = field(default_factory=lambda: Bounded(MAX_WAITING))
    """Request id -> the context of the flow that asked (its answer may come on the event stream)."""
    passed: Bounded = field(default_factory=lambda: Bounded(MAX_WAITING))
    """Id of a server request passed on to the client -> its method (what the client may answer)."""
    used: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self) -> None:
        self.open: OrderedDict[tuple[str, str], Session] = OrderedDict()

    def get(self, connection: str, sid: str) -> Session | None:
        session = self.open.get((connection, sid))
        if session is not None:
            session.used = time.monotonic()
        return session

    def bind(self, connection: str, sid: str, principal: Principal, endpoint: str = "") -> Session | None:
        """The session `sid` for `principal`: new, or theirs already. None when another
        principal holds it (a server that reissued an id, or one guessed)."""
        session = self.open.get((connection, sid))
        if session is not None:
            return session if session.owner == owner(principal) else None
        session = Session(connection, sid, owner(principal), endpoint)
        self.open[(connection, sid)] = session
        while len(self.open) > MAX_SESSIONS:
            self.open.popitem(last=False)
        return session

    def end(self, connection: str, sid: str) -> None:
        self.open.pop((connection, sid), None)

    def sweep(self, idle: float) -> int:
        """Forget sessions idle longer than `idle` seconds; how many were forgotten."""
        cutoff = time.monotonic() - idle
        stale = [k for k, s in self.open.items() if s.used < cutoff]
        for k in stale:
            del self.open[k]
        return len(stale)


@dataclass
class Pin:
    """A tool's pinned definition (its SHA-256), and the one last listed when it differs."""

    tool: str
    fingerprint: str
    source: str  # configured | first-seen
    definition: dict[str, Any] | None = None
    listed: str = ""
    listed_definition: dict[str, Any] | None = None

    @property
    def changed(self) -> bool:
        return bool(self.listed) and self.listed != self.fingerprint

    @property
    def annotations(self) -> dict[str, Any] | None:
        """The annotations of the pinned definition: a change cannot make a tool read-only."""
        return None if self.definition is None else (self.definition.get("annotations") or {})


@dataclass(frozen=True)
class Sighting:
    """What listing a tool meant: `pinned` (first seen, now pinned), `same`, `changed` (it
    differs from its pin, newly or again), `unpinned` (not pinned, and new tools are refused)."""

    pin: Pin | None
    outcome: str
    news: bool
    """Whether this sighting is new information worth an audit event."""


class Pins:
    def __init__(self) -> None:
        self.by_connection: dict[str, dict[str, Pin]] = {}

    def configure(self, connections: tuple[Connection, ...], first_seen: list[dict[str, Any]]) -> None:
        """Pins from the configuration, then the ones learned before (the store's)."""
        self.by_connection = {}
        for c in connections:
            if c.mcp is not None:
                self.by_connection[c.name] = {t: Pin(t, fp, "configured") for t, fp in c.mcp.pins}
        for row in first_seen:
            tools = self.by_connection.get(row["connection"])
            if tools is not None and row["tool"] not in tools:
                tools[row["tool"]] = Pin(row["tool"], row["fingerprint"], "first-seen", row["definition"])

    def get(self, connection: str, tool: str) -> Pin | None:
        return self.by_connection.get(connection, {}).get(tool)

    def see(self, conn: Connection, tool: dict[str, Any]) -> Sighting:
        """A tool as a server lists it: pin it when first seen (unless new tools are refused),
        or compare it with its pin."""
        name, fp = tool["name"], mcp.tool_fingerprint(tool)
        tools = self.by_connection.setdefault(conn.name, {})
        pin = tools.get(name)
        if pin is None:
            if conn.mcp.new_tools == "refuse":
                return Sighting(None, "unpinned", True)
            pin = tools[name] = Pin(name, fp, "first-seen", tool, fp, tool)
            return Sighting(pin, "pinned", True)
        news = pin.listed != fp
        pin.listed, pin.listed_definition = fp, tool
        if fp == pin.fingerprint:
            if pin.definition is None:  # a configured pin, seen for the first time: now its annotations are known
                pin.definition = tool
            return Sighting(pin, "same", False)
        return Sighting(pin, "changed", news)


def tool_call(conn: Connection, op: Operation, pin: Pin | None) -> Operation:
    """A tool call as the gateway decides on it: its action from the connection's
    configuration, else (where it trusts them) from the annotations of the pinned
    definition, else exec; the server's own annotations, as a claim on record; and whether
    the tool's definition changed since it was pinned."""
    tool, settings = op.details["tool"], conn.mcp
    action, source = settings.action(tool), "configuration"
    if action is None and settings.trust_annotations and pin is not None and pin.annotations is not None:
        action, source = mcp.annotated_action(pin.annotations), "annotations"
    if action is None:
        action, source = mcp.EXEC, "unconfigured"
    details = {**op.details, "action_from": source, "pin": pin.source if pin else "unlisted"}
    if pin is not None:
        claim = (pin.listed_definition or pin.definition or {}).get("annotations")
        if claim:
            details["annotations"] = claim
        if pin.changed:
            details.update(changed=True, pinned=pin.fingerprint, listed=pin.listed)
    elif settings.new_tools == "refuse":
        details.update(changed=True, pinned="", listed="")
    risk = mcp.UNCONFIGURED_TOOL_RISK if source == "unconfigured" else mcp.RISK[action]
    return dataclasses.replace(op, action=action, risk=risk, details=details)


def configured(conn: Connection, op: Operation) -> Operation:
    """An operation's tool calls as the configuration alone says (no pins seen): what
    `custody rules explain` decides on."""
    if op.parts:
        return dataclasses.replace(op, parts=tuple(configured(conn, p) for p in op.parts))
    return tool_call(conn, op, None) if op.details.get("method") == "tools/call" and "tool" in op.details else op
