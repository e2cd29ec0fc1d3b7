"""retention: prunes the audit log to `store.retention` by itself (`custody audit prune`, on a timer).

Every `store.prune_every`, the events older than the retention period are removed behind
a signed checkpoint, so the rest of the chain still verifies (AuditStore.prune: the prefix
is verified, and written to `store.archive` first when one is configured; if either
fails, nothing is removed). The prune never goes past an event a configured sink has not
delivered yet (its cursor in the store): a sink that is down holds the log back instead of
losing what it has not shipped. The checkpoint is signed with the store's signing key
(`store.signing_key`, else audit-signing.key beside the store), which automatic retention
therefore needs on the gateway host.

It runs on a thread of its own with a store connection of its own, so neither the flows
nor the approvals wait for it. Replicas that prune at the same moment are safe: the store
takes one prune and refuses the others ("the store changed while pruning"), which are
logged and tried again at the next round.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from typing import Any

from addons.auditlog import AuditLog
from addons.engine import metrics
from addons.engine.config import Config
from addons.engine.signing import Signer
from addons.engine.store import open_store
from addons.evidence.exports import archive_writer
from addons.settings import Settings

logger = logging.getLogger(__name__)


def archive_path(directory: str, now: float) -> str:
    """A new archive bundle's file in `directory`, named by when it was written."""
    stamp = datetime.datetime.fromtimestamp(now, datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return os.path.join(directory, f"custody-audit-{stamp}.jsonl")


def prune_once(cfg: Config, replica: str, now: float) -> dict[str, Any] | None:
    """One round (blocking): the checkpoint document, or None when nothing could go."""
    store = open_store(cfg.store, replica)
    try:
        cursors = store.sink_cursors()
        keep_after = min((cursors.get(s.name, 0) for s in cfg.sinks), default=None)
        signer = Signer.open(cfg.store.signing_key_path)
        archive = None
        if cfg.store.archive:
            os.makedirs(cfg.store.archive, exist_ok=True)
            archive = archive_writer(archive_path(cfg.store.archive, now), signer)
        return store.prune(now - cfg.store.retention, lambda doc: signer.sign(doc).as_dict(), archive, keep_after)
    finally:
        store.close()


class Retention:
    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings, self.log = settings, log
        self.task: asyncio.Task | None = None

    def running(self) -> None:
        self.task = asyncio.ensure_future(self._forever())

    def done(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _forever(self) -> None:
        while True:
            cfg = self.settings.require()
            if cfg.store.retention:
                await self.round(cfg)
            await asyncio.sleep(cfg.store.prune_every)

    async def round(self, cfg: Config) -> None:
        try:
            document = await asyncio.to_thread(prune_once, cfg, self.log.replica.id, time.time())
        except Exception as e:
            metrics.RETENTION_FAILURES.inc()
            logger.warning("custody: retention: pruning failed (%s: %s); nothing was removed, tried again in %ss",
                           type(e).__name__, e, cfg.store.prune_every)
            return
        if document is not None:
            metrics.RETENTION_PRUNED.inc(document["pruned"])
            archived = document.get("archive", {}).get("file")
            logger.info("custody: retention: pruned %d events (%d-%d)%s", document["pruned"], document["first_seq"],
                        document["seq"], f", archived to {archived}" if archived else "")
