"""auditlog: the audit store, opened once and shared by everything that writes to it.

The recorder writes flows; the approvals book writes approval steps; both go through the
one writer so they share one hash chain and one order. Reads (the approvals API, restart)
use a separate connection on the event loop, which WAL lets run beside the writer.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

from addons.engine.store import Event, Store, StoreError, Writer
from addons.settings import Settings


class AuditLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.writer: Writer | None = None
        self.reader: Store | None = None

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require().store
        os.makedirs(os.path.dirname(cfg.path) or ".", exist_ok=True)
        self.done()
        try:
            self.writer = Writer(cfg.path, cfg.synchronous)
            self.reader = Store(cfg.path, cfg.synchronous)
        except (StoreError, sqlite3.Error, OSError) as e:
            self.settings.invalid(f"audit store: {e}")

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None:
            self.reader.close()

    async def write(self, events: list[Event], apply: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Append `events` (and apply `apply` in the same transaction); raises if not on disk."""
        await self.writer.append(events, apply)
