"""sinks: ships the audit log, as it is written, to the configured sinks (`sinks:`).

One shipper per sink, beside the flows and never in their way: it reads the store through
the audit log's reader thread, delivers on a thread of its own (addons/engine/sinks.py),
and no flow waits for it. Per sink, in a loop:

1. claim the sink in the store (`sink_cursors`: its cursor and a lease, so that of several
   replicas or workers exactly one ships it at a time; one that stops hands it over at
   once, and one that died is taken over from when its lease ends);
2. read the next batch after the cursor, in the chain's order;
3. deliver it, and only then move the cursor past it.

So every event is delivered at least once and in order, from wherever the sink stopped
(a restart, a sink outage, another replica). A batch whose delivery failed is tried again,
with a growing pause (to 30 s), and nothing moves on until it went through: a batch
delivered whose cursor could not be saved (the gateway died just then) is delivered again.
Nothing is dropped: a sink that is down only falls behind, which `custody_sink_backlog`
(events) and `custody_sink_lag_seconds` (the age of the oldest undelivered event) show,
and the first failure of an outage is logged, as is the recovery.
"""

from __future__ import annotations

import asyncio
import logging
import time

from addons.auditlog import AuditLog
from addons.engine import metrics
from addons.engine import sinks as transports
from addons.engine.config import SinkConfig
from addons.settings import Settings

logger = logging.getLogger(__name__)
LEASE = 10.0
"""How long a replica's claim on a sink lasts without renewal (renewed every batch)."""
BACKOFF = (0.2, 30.0)


class Shipper:
    """One sink's loop (see the module docstring)."""

    def __init__(self, cfg: SinkConfig, log: AuditLog) -> None:
        self.cfg, self.log = cfg, log
        self.transport = transports.transport(cfg)
        self.failures = 0

    async def run(self) -> None:
        try:
            while True:
                try:
                    pause = await self.step()
                except Exception as e:
                    pause = self._failed(e)
                await asyncio.sleep(pause)
        finally:
            await asyncio.to_thread(self.transport.close)

    async def step(self) -> float:
        """Ship one batch; how long to wait before the next."""
        reader, me = self.log.reader, self.log.replica.id
        cursor = await self.log.call(reader.claim_sink, self.cfg.name, me, LEASE)
        if cursor is None:
            return LEASE / 2  # another replica ships this sink
        batch = await self.log.call(reader.after, cursor, self.cfg.batch)
        head, _ = await self.log.call(reader.head)
        self._behind(head - cursor, batch[0]["ts"] if batch else None)
        if not batch:
            return self.cfg.interval
        await asyncio.to_thread(self.transport.deliver, [transports.record(r) for r in batch])
        if not await self.log.call(reader.advance_sink, self.cfg.name, me, batch[-1]["seq"]):
            logger.warning("custody: sink %s: another replica took it over; it ships from its cursor", self.cfg.name)
        metrics.SINK_DELIVERED.labels(self.cfg.name).inc(len(batch))
        self._behind(head - batch[-1]["seq"], None)
        if self.failures:
            logger.info("custody: sink %s delivers again after %d failed attempts", self.cfg.name, self.failures)
            self.failures = 0
        return 0.0 if len(batch) == self.cfg.batch else self.cfg.interval

    def _behind(self, backlog: int, oldest: float | None) -> None:
        metrics.SINK_BACKLOG.labels(self.cfg.name).set(max(backlog, 0))
        metrics.SINK_LAG.labels(self.cfg.name).set(max(time.time() - oldest, 0.0) if oldest else 0.0)

    def _failed(self, error: Exception) -> float:
        metrics.SINK_FAILURES.labels(self.cfg.name).inc()
        if not self.failures:
            logger.warning("custody: sink %s failed (%s: %s); its events wait in the store and are retried",
                           self.cfg.name, type(error).__name__, error)
        self.failures += 1
        return min(BACKOFF[0] * 2 ** (self.failures - 1), BACKOFF[1])


class Sinks:
    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings, self.log = settings, log
        self.configured: tuple[SinkConfig, ...] = ()
        self.tasks: list[asyncio.Task] = []

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        configured = self.settings.require().sinks
        if configured != self.configured:
            self.configured = configured
            if self.tasks:  # a new configuration while running: ship as it says from now on
                self.done()
                self.running()

    def running(self) -> None:
        self.tasks = [asyncio.ensure_future(Shipper(cfg, self.log).run()) for cfg in self.configured]

    def done(self) -> None:
        """Stop shipping, and hand the sinks over: the leases end now, not in LEASE seconds
        (a batch in delivery meanwhile may then be delivered again by the next owner)."""
        for task in self.tasks:
            task.cancel()
        if self.tasks and self.log.reader is not None:
            try:
                self.log.call_now(self.log.reader.release_sinks, self.log.replica.id)
            except Exception as e:
                logger.warning("custody: handing the sinks over failed (%s: %s); another replica takes them "
                               "over when the lease ends", type(e).__name__, e)
        self.tasks = []
