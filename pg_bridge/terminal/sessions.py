"""The gateway's side of pg_bridge sessions: one pinned backend connection per session.

A session is opened by a `connect` request and belongs to the principal who opened it:
a request naming someone else's session id is refused as if the session did not exist,
so session ids cannot be borrowed. The session also remembers what its SQL-level
`PREPARE` statements do, so that `EXECUTE name` is classified as the statement it runs.
Sessions idle longer than IDLE are closed (a client that vanished without `close`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from addons.engine.bridge import IDLE, SWEEP
from addons.engine.model import Principal
from pg_bridge.terminal.backend import Backend

logger = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    owner: tuple[str, str]
    connection: str
    backend: Backend
    prepared: dict[str, dict[str, Any]] = field(default_factory=dict)
    cursors: dict[str, str] = field(default_factory=dict)
    """Cursors declared on the backend (SQL DECLARE, and the bridge's named portals) → the
    statement that declared them, so a FETCH's rows are masked as that statement's."""
    used: float = field(default_factory=time.monotonic)
    xid: str | None = None
    """The id of the transaction the session is in, once a write gave it one."""

    def remember(self, parts: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        """Track SQL-level prepared statements and cursors from the statements that succeeded."""
        for details, result in zip(parts, results):
            if "error" in result:
                return
            command = details.get("command")
            if command == "PREPARE":
                self.prepared[details["name"]] = details
            elif command == "DECLARE CURSOR":
                self.cursors[details["name"]] = details["sql"]
            elif command == "CLOSE PORTAL":
                if details.get("name"):
                    self.cursors.pop(details["name"], None)
                else:
                    self.cursors.clear()
            elif command == "DEALLOCATE":
                if details.get("all"):
                    self.prepared.clear()
                else:
                    self.prepared.pop(details.get("name", ""), None)
            elif command == "DISCARD":
                self.prepared.clear()
                self.cursors.clear()

    def statement(self, details: dict[str, Any]):
        """The SQL whose rows a statement returns: a cursor's for FETCH, the prepared one's
        for EXECUTE, its own otherwise; None when that is not known."""
        command = details.get("command")
        if command == "FETCH":
            return self.cursors.get(details.get("name", ""))
        if command == "EXECUTE":
            return details.get("prepared_sql")
        return details.get("sql")


class Sessions:
    """Open sessions by id. A shared service of the chain (no flow hooks)."""

    def __init__(self) -> None:
        self.open: dict[str, Session] = {}
        self._sweeper: asyncio.Task | None = None

    def running(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for s in list(self.open.values()):
            self.close(s.id)

    @staticmethod
    def owner(principal: Principal) -> tuple[str, str]:
        return principal.issuer, principal.subject

    def get(self, session_id: str, principal: Principal | None, connection: str) -> Session | None:
        s = self.open.get(session_id)
        if s is None or principal is None or s.owner != self.owner(principal) or s.connection != connection:
            return None
        s.used = time.monotonic()
        return s

    def taken(self, session_id: str, principal: Principal) -> bool:
        """Is this session id someone else's? (A connect must not replace their session.)"""
        s = self.open.get(session_id)
        return s is not None and s.owner != self.owner(principal)

    def add(self, session: Session) -> None:
        old = self.open.pop(session.id, None)
        if old is not None:
            old.backend.close()
        self.open[session.id] = session

    def close(self, session_id: str) -> None:
        s = self.open.pop(session_id, None)
        if s is not None:
            s.backend.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            for s in [s for s in self.open.values() if now - s.used > IDLE and not s.backend.lock.locked()]:
                logger.info("custody: closing pg session %s, idle for %.0f s", s.id, now - s.used)
                self.close(s.id)
