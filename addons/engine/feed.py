"""The approvals' change feed: every change to an approval, numbered, for the approvers'
inbox (server-sent events on the page, `custody approvals watch` in a terminal).

A reader asks for the changes after the last mark it saw and waits until there are some
(or its time is up); one that fell further behind than the feed keeps, or whose mark is
another feed's (another replica behind the same load balancer, or this one before a
restart: their numbers mean nothing here), is told to reload. Plain asyncio: the approval
book publishes on the event loop, readers wait on it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque


class Feed:
    def __init__(self, keep: int = 2048) -> None:
        self.epoch = secrets.token_hex(6)
        self.seq = 0
        self.recent: deque[tuple[int, str]] = deque(maxlen=keep)
        self._changed: asyncio.Event | None = None

    def publish(self, approval_id: str) -> None:
        self.seq += 1
        self.recent.append((self.seq, approval_id))
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def mark(self, seq: int | None = None) -> str:
        """The mark a reader gives back to continue after change `seq` (default: the latest)."""
        return f"{self.epoch}-{self.seq if seq is None else seq}"

    def position(self, mark: str) -> int | None:
        """The change number a mark of this feed names; None for another feed's or garbage."""
        epoch, _, seq = mark.partition("-")
        return int(seq) if epoch == self.epoch and seq.isdigit() else None

    def since(self, after: int) -> tuple[list[tuple[int, str]], bool]:
        """The changes after `after`, and whether some between were forgotten (reload all)."""
        changes = [c for c in self.recent if c[0] > after]
        forgotten = after > self.seq or (bool(self.recent) and after < self.recent[0][0] - 1)
        return changes, forgotten

    async def wait(self, after: int, timeout: float) -> tuple[list[tuple[int, str]], bool]:
        """The changes after `after`, waiting up to `timeout` seconds for the first."""
        if after == self.seq:
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
        return self.since(after)
