"""replica: this gateway process as one replica of several behind a load balancer.

- Its lease: a heartbeat row in the audit store, renewed every quarter lease, naming what
  it runs (the rule set's and the configuration's hashes) and whether it is running,
  stopping or stopped. The other replicas abandon the approvals it held once it lapses
  (the approval book's sweep); `custody status` lists the live ones.
- Where bridge sessions live: every answer to a bridge step names this replica
  (`x-custody-replica`), so a bridge whose link breaks never continues a session on
  another replica (addons/engine/bridge.py `Link`).
- Reconciling the replicas that are gone (addons/engine/reconcile.py): on its first beat,
  and on later ones (a replica on another host is gone once its lease lapses), it closes
  their open flows with `interrupted` events, looks up whether their SQL transactions
  committed, and marks the responses of those the crash rolled back; once per replica,
  however many replicas start together.
- Its readiness, for `/readyz` (addons/wellknown.py): the store answers, the rules are
  loaded, masking is ready, and it is not stopping.
- How it stops (`stop`, which `custody run` calls on SIGTERM): it says it is stopping (so
  `/readyz` fails), answers the requests held for approval with a refusal (their
  approvals abandoned: nothing may run them later), keeps accepting connections for
  `gateway.drain_delay` while load balancers' health checks take it out (closing a
  listener resets the connections still in its backlog), then closes its listeners, and
  waits, `gateway.grace` in all, for the flows in flight. Meanwhile every response carries
  `Connection: close`, so clients take their next request elsewhere.
  Under mitmdump, which stops at once, `done` still abandons the held approvals (waiting
  for the store: mitmproxy's `done` cannot be asynchronous).

It is listed before the audit log so that its `done` runs while the store is still open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import ctx, http

from addons import failclosed
from addons.approvalbook import ApprovalBook
from addons.auditlog import AuditLog
from addons.engine import reconcile
from addons.engine.bridge import POSTGRES, REPLICA_HEADER, SSH
from addons.engine.errors import Error
from addons.engine.replicas import STOPPED
from addons.failclosed import guarded
from addons.maskpool import MaskPool
from addons.policy import Policy
from addons.settings import Settings
from pg_bridge.terminal.backend import conninfo, transaction_statuses

logger = logging.getLogger(__name__)
INFLIGHT = "custody-inflight"
"""flow.metadata: the flow is counted as in flight until its response (or error, or the end
of its WebSocket session)."""


class Replica:
    def __init__(self, settings: Settings, log: AuditLog, book: ApprovalBook, policy: Policy, pool: MaskPool) -> None:
        self.settings, self.log, self.book, self.policy, self.pool = settings, log, book, policy, pool
        self.state = "running"
        self.inflight = 0
        self.lease = self.grace = 10.0
        self.drain_delay = 1.0
        self._beater: asyncio.Task | None = None
        self._silent = False

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            cfg = self.settings.require().replica
            self.lease, self.grace, self.drain_delay = cfg.lease, cfg.grace, cfg.drain_delay

    def running(self) -> None:
        self._beater = asyncio.ensure_future(self._beat_forever())

    def done(self) -> None:
        if self._beater:
            self._beater.cancel()
        if self.state != "stopped" and self.log.reader is not None:
            self.book.drain_now(STOPPED)
            self.state = "stopped"
            try:
                self.log.call_now(self.log.reader.beat, self.row())
            except Exception as e:
                logger.warning("custody: recording that this replica stopped failed (%s: %s)", type(e).__name__, e)

    # the lease

    def row(self) -> dict[str, Any]:
        me = self.log.replica
        rules = self.policy.rules
        return {"id": me.id, "host": me.host, "pid": me.pid, "started": me.started, "state": self.state,
                "rules": rules.digest if rules else "", "config": self.settings.require().digest,
                "listen": f"{ctx.options.listen_host or '*'}:{ctx.options.listen_port}"}

    async def beat(self) -> bool:
        try:
            await self.log.call(self.log.reader.beat, self.row())
        except Exception as e:
            if not self._silent:
                logger.warning("custody: renewing this replica's lease failed (%s: %s); retrying", type(e).__name__, e)
            self._silent = True
            return False
        self._silent = False
        return True

    async def _beat_forever(self) -> None:
        while True:
            if await self.beat():
                await self.reconcile()
            await asyncio.sleep(max(self.lease / 4, 0.1))

    # reconciling after a crash

    async def reconcile(self) -> None:
        """Close the open flows of every replica that is gone; a failure is retried next beat."""
        me, reader = self.log.replica, self.log.reader
        trusted = self.log.problem is None and time.time() - self.log.up_since >= self.lease
        try:
            for row, why in reconcile.gone(await self.log.call(reader.replicas), me.id, self.lease, me.host, trusted):
                flows = await self.log.call(reader.open_flows, row["id"], reconcile.OUTCOMES)
                transactions = reconcile.open_transactions(await self.log.call(reader.transaction_responses, row["id"]))
                statuses = await self._statuses(transactions)
                plan = reconcile.plan(row["id"], why, flows, transactions, statuses)
                if await self.log.call(reader.reconcile, row["id"], plan.events):
                    logger.warning("custody: reconciled replica %s (%s): %d open flows interrupted, %d SQL responses "
                                   "rolled back", row["id"], why, len(flows), len(plan.rolled_back))
        except Exception as e:
            logger.warning("custody: reconciling lost replicas failed (%s: %s); retrying", type(e).__name__, e)

    async def _statuses(self, transactions: list[reconcile.Transaction]) -> dict[str, str | None]:
        """Whether each transaction committed, asked of its connection's database (a
        database that cannot be asked leaves its transactions unknown)."""
        out: dict[str, str | None] = {}
        registry = self.settings.registry
        for name in sorted({t.connection for t in transactions}):
            conn = registry.by_name.get(name)
            if conn is None:
                continue
            info = conninfo(conn.upstream.host, conn.upstream.port, conn.upstream.database, conn.credential.header,
                            conn.credential.value, conn.ca_file, {})
            try:
                out.update(await asyncio.to_thread(transaction_statuses, info,
                                                   [t.xid for t in transactions if t.connection == name]))
            except Exception as e:
                logger.warning("custody: cannot ask %s whether its transactions committed (%s: %s)", name,
                               type(e).__name__, e)
        return out

    # readiness

    def problems(self) -> list[str]:
        """Why this replica should not be sent requests now (none: ready)."""
        out = []
        if self.state != "running":
            out.append("the gateway is stopping")
        if self.log.problem is not None:
            out.append(f"the audit store is unavailable ({self.log.problem})")
        if self.policy.rules is None:
            out.append("no rules are loaded")
        ready = self.pool.ready
        if ready is None or not ready.done() or ready.cancelled() or ready.exception() is not None:
            out.append("masking is not ready")
        return out

    # stopping

    async def stop(self) -> None:
        """Stop taking requests and finish those in flight (see the module docstring)."""
        if self.state != "running":
            return
        self.state = "stopping"
        logger.info("custody: stopping: %d flows in flight, %d held; grace %ss", self.inflight,
                    len(self.book.waiters), self.grace)
        await self.beat()
        await self.book.drain(STOPPED)
        deadline = time.monotonic() + self.grace
        await asyncio.sleep(min(self.drain_delay, self.grace))  # /readyz fails meanwhile: balancers move on
        await ctx.master.addons.get("proxyserver").servers.update([])
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            logger.warning("custody: %d flows still in flight after the grace period; closing them", self.inflight)
        self.state = "stopped"
        await self.beat()

    @guarded
    def requestheaders(self, f: http.HTTPFlow) -> None:
        if INFLIGHT not in f.metadata:
            f.metadata[INFLIGHT] = True
            self.inflight += 1
        wanted = f.request.headers.pop(REPLICA_HEADER, None)
        if wanted is not None and wanted != self.log.replica.id:  # a balancer sent a session's step elsewhere
            failclosed.refuse(f, 421, f"this step belongs to a session on gateway replica {wanted}; nothing was "
                                      "forwarded", error=Error.WRONG_REPLICA)

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        if any(c.session_header in f.request.headers for c in (POSTGRES, SSH)):
            f.response.headers[REPLICA_HEADER] = self.log.replica.id  # where the bridge session lives
        if self.state != "running" and f.request.http_version.startswith("HTTP/1") and f.response.status_code != 101:
            f.response.headers["connection"] = "close"  # the client's next request goes to another replica

    @guarded
    def response(self, f: http.HTTPFlow) -> None:
        if f.websocket is None:
            self._finished(f)

    @guarded
    def error(self, f: http.HTTPFlow) -> None:
        self._finished(f)

    @guarded
    def websocket_end(self, f: http.HTTPFlow) -> None:
        self._finished(f)

    def _finished(self, f: http.HTTPFlow) -> None:
        if f.metadata.pop(INFLIGHT, False):
            self.inflight -= 1
