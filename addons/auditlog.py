"""auditlog: the audit store, opened once and shared by everything that writes to it.

The recorder writes flows; the approvals book writes approval steps; both go through the
one writer so they share one hash chain and one order, with every other replica of the
store. Everything else (the approvals API, the book's sweeps, the replica's heartbeat)
runs on one reader thread of its own, off the event loop: a shared store is a network
away, and a store that is down must not stall the flows that need nothing from it.

It also keeps how the store is doing: `problem` says why the last thing asked of it
failed (None once something succeeds again), `up_since` since when it has answered.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from addons.engine import metrics
from addons.engine.config import StoreConfig
from addons.engine.replicas import Identity
from addons.engine.store import AuditStore, Change, Event, Kept, StoreError, Writer, open_store
from addons.settings import Settings


class AuditLog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.replica = Identity.new()
        self.writer: Writer | None = None
        self.reader: AuditStore | None = None
        self.problem: str | None = None
        self.up_since = time.time()
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="custody-audit-reader")

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require().store
        if cfg.path:
            os.makedirs(os.path.dirname(cfg.path) or ".", exist_ok=True)
        self.done()
        try:
            self.open(cfg)
        except (StoreError, sqlite3.Error, OSError) as e:
            self.settings.invalid(f"audit store: {e}")

    def open(self, cfg: StoreConfig) -> None:
        self.writer = Writer(lambda: open_store(cfg, self.replica.id, writer=True),
                             lambda error: self._outcome(error, "write"), cfg.timeout)
        self.reader = open_store(cfg, self.replica.id)

    def done(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None:
            self.reader.close()

    def _outcome(self, error: BaseException | None, operation: str) -> None:
        """What the store just did (called from the writer's and the reader's threads)."""
        if error is None:
            if self.problem is not None:
                self.problem, self.up_since = None, time.time()
        else:
            metrics.STORE_ERRORS.labels(operation).inc()
            self.problem = f"{type(error).__name__}: {error}".strip().splitlines()[0]

    async def write(self, events: list[Event], kept: Sequence[Kept] = ()) -> None:
        """Append `events` (with what they record that is kept beside them: tool pins, an
        approver's sign-in); raises if they are not on record."""
        metrics.AUDIT_QUEUE.inc()
        try:
            with metrics.AUDIT_WRITE_SECONDS.time():
                await self.writer.append(events, kept)
        finally:
            metrics.AUDIT_QUEUE.dec()

    async def change(self, change: Change) -> dict[str, Any] | None:
        """Apply an approval's change with the events it decides on; its document after."""
        return await self.writer.change(change)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` (a method of `reader`) on the reader thread."""
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)
        except Exception as e:
            self._outcome(e, "read")
            raise
        self._outcome(None, "read")
        return result

    def call_now(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """`call`, blocking (for mitmproxy's `done`, which cannot wait asynchronously)."""
        return self._reads.submit(fn, *args).result(timeout)

    def listen(self, changed: Callable[[str | None], None]) -> Callable[[], None] | None:
        return self.reader.listen(changed)
