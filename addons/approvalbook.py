"""The approval book: approvals, their waiters, expiry and notifications; a shared service
of the chain (no flow hooks).

The audit store holds the truth about every approval, for every replica of the gateway:
each change is decided inside the store's transaction with the approval's row locked, on
the document the store holds at that moment, and written together with the audit event
recording it. So two approvers voting at the same moment on two replicas are counted once
each; an approval is executed once, by a conditional change (it must still be approved,
and held by this replica or by nobody); and expiry and abandonment happen once, by
whichever replica gets there first, while a decision made first stands.

The book remembers the approvals opened here (`live`) and the flows held here waiting on
them (`waiters`). A change made elsewhere reaches it as a notification from the store
(PostgreSQL: LISTEN/NOTIFY), and, on every sweep, by reading the live ones again (the
safety net for a notification lost while the store was away, and how SQLite's workers on
one host hear of each other). The same sweep expires approvals and abandons those held by
a replica whose lease lapsed (addons/engine/replicas.py). What an approval is, and how
votes count, is addons/engine/approval.py.

A time-boxed grant (addons/engine/grants.py) is part of the approval that issues it: the
step approving it writes the grant into its document, revocation is a step of the same
approval, both under its row lock, and the store keeps the grants table from those
documents in the same transaction, where every replica finds them. The approvers' inbox
follows a feed (addons/engine/feed.py) of every approval this replica hears changed — its
own steps, the store's notifications, and, each sweep, the approvals the store says were
updated since the last — so it shows decisions made on any replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from addons.auditlog import AuditLog
from addons.engine.approval import (
    ABANDONED,
    APPROVED,
    CONSOLE,
    DENIED,
    EXECUTED,
    EXPIRED,
    LIVE,
    PENDING,
    Approval,
    ApprovalError,
    Vote,
    check_vote,
    describe,
    tally,
    visible,
)
from addons.engine.errors import Error
from addons.engine.feed import Feed
from addons.engine.grants import ACTIVE, Grant, check_grant, issued
from addons.engine.model import Decision, Operation, Principal, new_id
from addons.engine.notify import Notifier
from addons.engine.replicas import lapsed
from addons.engine.store import Change, Event
from addons.settings import Settings

logger = logging.getLogger(__name__)
NEWS_OVERLAP = 5.0
"""Seconds before the feed's watermark that each sweep reads again (see `_news`)."""

Step = Callable[[Approval], "tuple[str, dict[str, Any]] | None"]
"""Changes an approval (as the store holds it now) in place and names the step and its
audit detail, or returns None: nothing to change (a decision made first stands)."""


class ApprovalBook:
    """Approvals, their waiters, expiry and notifications, over the shared store."""

    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings = settings
        self.log = log
        self.live: dict[str, Approval] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.notifier: Notifier | None = None
        self.feed = Feed()
        self.lease = 10.0
        self._updated = time.time()
        """The feed's watermark in the store: approvals updated after it are news."""
        self._seen: dict[tuple[str, float], None] = {}
        self._sweeper: asyncio.Task | None = None
        self._unlisten: Callable[[], None] | None = None

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            cfg = self.settings.require()
            self.notifier = Notifier(cfg.approvals, self._notified, self._posted, self._current)
            self.lease = cfg.replica.lease

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        self._unlisten = self.log.listen(lambda approval_id: loop.call_soon_threadsafe(self._heard, approval_id))
        # After a restart, before anything is served: what the old process held can never run now.
        # (Waiting here, not in a task: an error logged while mitmproxy starts stops it.)
        try:
            for approval_id, step in self._lost(self.log.call_now(self.log.reader.held_elsewhere, self.me), True):
                self._change_now(approval_id, step)
        except Exception as e:
            logger.warning("custody: abandoning lost replicas' holds failed (%s: %s); the sweep tries again",
                           type(e).__name__, e)
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self._unlisten:
            self._unlisten()

    @property
    def me(self) -> str:
        return self.log.replica.id

    # changing approvals

    def _event(self, approval: Approval, step: str, actor: Principal | None = None, **detail: Any) -> Event:
        """The audit event recording a step of the approval, in its state after the step."""
        effect = {APPROVED: "allow", EXECUTED: "allow", DENIED: "deny"}.get(approval.state)
        return Event(
            id=new_id(),
            kind="approval",
            session=approval.session,
            flow=approval.flow,
            principal=actor or approval.requester,
            operation=approval.operation,
            decision=Decision(effect, tuple(approval.rules), approval.outcome or approval.reason,
                              approval=approval.id) if effect else None,
            approval=approval.id,
            detail={"step": step, "state": approval.state, "fingerprint": approval.fingerprint, **detail},
        )

    def _decision(self, approval_id: str, step: Step, actor: Principal | None) -> tuple[Change, list[str]]:
        """The store's Change applying `step` under the approval's row lock, and where the
        name of the step taken goes (nothing when it took none)."""
        taken: list[str] = []

        def decide(document: dict[str, Any] | None) -> tuple[dict[str, Any] | None, list[Event]]:
            if document is None:
                raise ApprovalError(404, Error.NOT_FOUND, f"no approval {approval_id}")
            approval = Approval.from_document(document)
            done = step(approval)
            if done is None:
                return None, []
            name, detail = done
            taken.append(name)
            return approval.document(), [self._event(approval, name, actor, **detail)]

        return Change(approval_id, decide), taken

    async def _change(self, approval_id: str, step: Step, actor: Principal | None = None) -> tuple[Approval, str]:
        """Apply `step` to the approval under its row lock; the approval as it is after
        (the local copy refreshed, its waiter woken) and the step taken ("" for none)."""
        change, taken = self._decision(approval_id, step, actor)
        approval = self._known(await self.log.change(change))
        if taken:
            self.feed.publish(approval.id)
        if taken[:1] in ([APPROVED], [DENIED]):
            self.notifier.send("decided", approval)
        elif taken[:1] in ([EXPIRED], [ABANDONED]):
            self.notifier.send("expired", approval)
        elif taken[:1] in (["vote"], ["grant_revoked"]):
            self.notifier.send("voted", approval)
        return approval, (taken or [""])[0]

    def _known(self, document: dict[str, Any]) -> Approval:
        """The approval as the store holds it: the local copy refreshed (or a new one); a
        waiting flow is woken once it is decided."""
        approval = self.live.get(document["id"])
        approval = approval.refresh(document) if approval else Approval.from_document(document)
        if approval.state not in LIVE:
            self.live.pop(approval.id, None)
        if approval.state != PENDING:
            future = self.waiters.pop(approval.id, None)
            if future is not None and not future.done():
                future.set_result(approval.state)
        return approval

    # the hold's side

    async def grant_covering(self, principal: Principal, operation: Operation, rules: tuple[str, ...]) -> Grant | None:
        """An active time-boxed grant inside which this request falls (issued on any replica)."""
        now = time.time()
        documents = await self.log.call(lambda: self.log.reader.grants(
            active_at=now, subject=principal.subject, connection=operation.connection))
        return next((g for g in map(Grant.from_document, documents) if g.covers(principal, operation, rules, now)),
                    None)

    async def grant_for(self, fp: str, principal: Principal) -> Approval | None:
        """An approved, unused, unexpired approval, held by no flow, for exactly this request
        by this principal (found by any replica: whoever re-sends it, wherever)."""
        now = time.time()
        for document in await self.log.call(lambda: list(self.log.reader.approvals(
                states=(APPROVED,), requester=principal.subject, fingerprint=fp))):
            if (not document["held"] and document["expires"] > now
                    and document["requester"]["issuer"] == principal.issuer):
                return self._known(document)
        return None

    async def unheld(self, fp: str, principal: Principal, approval_id: str | None = None) -> Approval | None:
        """A pending approval of exactly this request by this principal that no flow holds
        (the one `approval_id` names, when given), held again by this replica from now:
        a client that came back for the answer waits on it (addons/mcpguard.py)."""
        now = time.time()
        me = self.me
        for document in await self.log.call(lambda: list(self.log.reader.approvals(
                states=(PENDING,), requester=principal.subject, fingerprint=fp))):
            if document["held"] or document["expires"] <= now or approval_id not in (None, document["id"]) \
                    or document["requester"]["issuer"] != principal.issuer:
                continue

            def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
                if a.state != PENDING or a.held or a.expires <= time.time():
                    return None  # decided, or taken by another request, a moment ago
                a.held, a.replica = True, me
                if a.hold_until <= time.time():  # its hold timed out: this one lasts as long again
                    a.hold_until = min(a.expires, time.time() + min(r.timeout for r in a.reviews))
                return "held_again", {}

            approval, taken = await self._change(document["id"], step)
            if taken:
                self.live[approval.id] = approval
                return approval
        return None

    async def open(self, principal: Principal, operation: Operation, request: dict[str, Any], fp: str,
                   decision: Decision, flow: str, session: str) -> Approval:
        now = time.time()
        reviews = list(decision.reviews)
        approval = Approval(
            id=new_id(),
            state=PENDING,
            created=now,
            requester=principal,
            operation=operation,
            request=request,
            fingerprint=fp,
            rules=list(decision.rules),
            reason=decision.reason,
            reviews=reviews,
            hold_until=now + min(r.timeout for r in reviews),
            expires=now + min(r.ttl for r in reviews),
            flow=flow,
            session=session,
            replica=self.me,
        )
        event = self._event(approval, "requested", risk=operation.risk, approvers=approval.approvers(),
                            rules=approval.rules, policy=approval.reason)
        await self.log.change(Change(approval.id, lambda _: (approval.document(), [event])))
        self.live[approval.id] = approval  # only once its request is on record
        self.feed.publish(approval.id)
        self.notifier.send("pending", approval)
        return approval

    def waiter(self, approval_id: str) -> asyncio.Future:
        future = self.waiters.get(approval_id)
        if future is None:
            future = self.waiters[approval_id] = asyncio.get_running_loop().create_future()
            approval = self.live.get(approval_id)
            if approval is not None and approval.state != PENDING:
                future.set_result(approval.state)
        return future

    async def release(self, approval: Approval, why: str = "hold_timeout") -> None:
        """The hold ended before a decision (it timed out, or the client's keep-alive window
        did): the agent was told it is pending; it may come back for it."""
        self.waiters.pop(approval.id, None)

        def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
            if not a.held:
                return None
            a.held = False
            return why, {}

        await self._change(approval.id, step)

    async def execute(self, approval: Approval, flow: str, late: bool) -> None:
        """Use the approval, once: the flow it belongs to (or, `late`, an identical re-send
        once no flow holds it) goes upstream. Refused unless, under the lock, it is still
        approved and unexpired, and held by this replica (or, late, by nobody)."""
        me = self.me

        def step(a: Approval) -> tuple[str, dict[str, Any]]:
            if a.state != APPROVED:
                raise ApprovalError(409, Error.NOT_APPROVED, f"approval {a.id} is {a.state}, not approved")
            if a.expires <= time.time():
                raise ApprovalError(409, Error.NOT_APPROVED, f"approval {a.id} expired before it was used")
            if (late and a.held) or (not late and not (a.held and a.replica == me)):
                raise ApprovalError(409, Error.NOT_APPROVED, f"approval {a.id} belongs to another request")
            a.state, a.executed, a.held = EXECUTED, time.time(), False
            return "executed", {"executed_flow": flow, "late": late}

        try:
            await self._change(approval.id, step)
        except ApprovalError:
            approval.refresh((await self._read(approval.id)) or approval.document())
            raise
        self.live.pop(approval.id, None)

    async def abandon(self, approval: Approval, why: str) -> None:
        await self._change(approval.id, _ended(why))

    async def drain(self, why: str) -> None:
        """Stopping: every request held here is answered, its approval abandoned."""
        for approval_id in [i for i in self.waiters if i in self.live]:
            try:
                await self._change(approval_id, _ended(why))
            except Exception:
                logger.exception("custody: abandoning approval %s while stopping failed", approval_id)

    def drain_now(self, why: str) -> None:
        """Stopping without the event loop (mitmproxy's `done`): abandon the approvals of the
        requests held here, waiting for the store."""
        for approval_id in [i for i in self.waiters if i in self.live]:
            try:
                self._change_now(approval_id, _ended(why))
            except Exception:
                logger.exception("custody: abandoning approval %s while stopping failed", approval_id)

    def _change_now(self, approval_id: str, step: Step) -> None:
        """`_change`, waiting for the store on this thread (at start and at the end, when
        mitmproxy's hooks cannot wait asynchronously), through the reader's connection."""
        change, taken = self._decision(approval_id, step, None)
        outcome = self.log.call_now(self.log.reader.commit, [([], change)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        approval = self._known(outcome)
        if taken:
            self.feed.publish(approval.id)
            self.notifier.send("expired", approval)

    # the approvers' side

    async def _read(self, approval_id: str) -> dict[str, Any] | None:
        return await self.log.call(self.log.reader.approval, approval_id)

    async def get(self, approval_id: str) -> Approval:
        document = await self._read(approval_id)
        if document is None:
            raise ApprovalError(404, Error.NOT_FOUND, f"no approval {approval_id}")
        return self._known(document)

    async def timeline(self, approval_id: str) -> list[dict[str, Any]]:
        """Every audit event of the approval and of the flows it belongs to, in time order
        (a request is recorded once decided, after the time it arrived)."""
        rows = await self.log.call(self.log.reader.where, "approval = ?", [approval_id])
        return [
            {"seq": e["seq"], "ts": e["ts"], "kind": e["kind"], "subject": e["subject"], "effect": e["effect"],
             "reason": e["reason"], "status": e["status"], "detail": json.loads(e["detail"]) if e["detail"] else {}}
            for e in sorted(rows, key=lambda e: (e["ts"], e["seq"]))
        ]

    async def list(self, state: str | None = None, connection: str | None = None, requester: str | None = None,
                   limit: int = 100, viewer: Principal | None = None) -> list[Approval]:
        """Newest first; with `viewer`, only the approvals that principal may see."""
        documents = await self.log.call(lambda: list(self.log.reader.approvals(
            states=(state,) if state else (), connection=connection, requester=requester)))
        found = []
        for document in documents:
            approval = Approval.from_document(document)
            if viewer is None or visible(approval, viewer):
                found.append(approval)
                if len(found) >= limit:
                    break
        return found

    async def vote(self, approval_id: str, voter: Principal, vote: str, reason: str, grant: float = 0.0,
                   via: str = "api") -> Approval:
        """One approver's vote; an approving vote may ask for a time-boxed grant of `grant`
        seconds, which the approval issues once approved (when every approving vote asked)."""
        if grant and vote != "approve":
            raise ApprovalError(400, Error.GRANT_NOT_ALLOWED, "only an approving vote can grant")

        def step(a: Approval) -> tuple[str, dict[str, Any]]:
            check_vote(a, voter)
            if grant:
                check_grant(a.reviews, grant)
            a.votes.append(Vote(voter.subject, voter.issuer, list(voter.groups), vote, reason, time.time(),
                                via=via, grant=grant))
            extra = {"vote": vote, "reason": reason, "via": via, **({"grant_asked": grant} if grant else {})}
            outcome = tally(a.reviews, a.votes)
            if outcome == PENDING:
                return "vote", extra
            a.finish(outcome, describe(a, outcome))
            issue = issued(a, a.decided) if outcome == APPROVED else None
            if issue is not None:
                a.grant = issue.document()
                extra["grant"] = a.grant
            return outcome, {"outcome": a.outcome, **extra}

        approval, _ = await self._change(approval_id, step, voter)
        return approval

    # grants

    async def list_grants(self, viewer: Principal) -> list[Grant]:
        """Every grant `viewer` may see (its principal's, or those it may revoke), newest first."""
        documents = await self.log.call(self.log.reader.grants)
        return sorted((g for g in map(Grant.from_document, documents) if g.visible(viewer)),
                      key=lambda g: g.created, reverse=True)

    async def revoke(self, grant_id: str, who: Principal, reason: str) -> Grant:
        """End a grant before its time: a step of the approval that issued it."""
        found = await self.log.call(lambda: self.log.reader.grants(ids=(grant_id,)))
        grant = Grant.from_document(found[0]) if found else None
        if grant is None or not grant.visible(who):
            raise ApprovalError(404, Error.NOT_FOUND, f"no grant {grant_id}")
        if not grant.may_revoke(who):
            raise ApprovalError(403, Error.NOT_AN_APPROVER, f"{who.subject} is not an approver of grant {grant_id}")

        def step(a: Approval) -> tuple[str, dict[str, Any]]:
            current = Grant.from_document(a.grant) if a.grant and a.grant["id"] == grant_id else None
            if current is None:
                raise ApprovalError(404, Error.NOT_FOUND, f"no grant {grant_id}")
            if current.state() != ACTIVE:
                raise ApprovalError(409, Error.GRANT_ENDED, f"grant {grant_id} is {current.state()} already")
            current.revoked, current.revoked_by, current.reason = time.time(), who.subject, reason
            a.grant = current.document()
            return "grant_revoked", {"grant": a.grant, "reason": reason}

        approval, _ = await self._change(grant.approval, step, who)
        return Grant.from_document(approval.grant)

    async def console(self, approval: Approval, vote: str) -> None:
        """mitmweb's operator resumed (approve) or killed (deny) the held flow. A decision
        that was already made stands."""
        reason = "resumed in the mitmproxy console" if vote == "approve" else "killed in the mitmproxy console"

        def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
            if a.state != PENDING:
                return None
            a.votes.append(Vote(CONSOLE, "mitmproxy", [], vote, reason, time.time(), via="console"))
            outcome = tally(a.reviews, a.votes)
            a.finish(outcome, describe(a, outcome))
            return outcome, {"outcome": a.outcome, "vote": vote, "reason": reason, "via": "console"}

        await self._change(approval.id, step, Principal(CONSOLE, "mitmproxy"))

    # what other replicas did, expiry, lost replicas

    def _heard(self, approval_id: str | None) -> None:
        """The store says an approval changed (None: changes may have been missed)."""
        if approval_id is not None:
            self.feed.publish(approval_id)
        if approval_id is None or approval_id in self.live:
            asyncio.ensure_future(self._reread(None if approval_id is None else [approval_id]))

    async def _reread(self, ids: list[str] | None) -> None:
        ids = list(self.live) if ids is None else ids
        if not ids:
            return
        try:
            documents = await self.log.call(lambda: list(self.log.reader.approvals(ids=tuple(ids))))
        except Exception:
            logger.warning("custody: reading approvals %s failed; the next sweep reads them again", ", ".join(ids))
            return
        for document in documents:
            self._known(document)

    async def _sweep(self) -> None:
        jobs = (("expiring approvals", self._expire), ("abandoning lost replicas' holds", self._abandon_lapsed),
                ("reading live approvals again", lambda: self._reread(None)),
                ("reading what other replicas changed", self._news))
        while True:
            await asyncio.sleep(self.settings.require().approvals.sweep)
            for what, job in jobs:
                try:
                    await job()
                except Exception as e:
                    logger.warning("custody: %s failed (%s: %s); the next sweep tries again", what,
                                   type(e).__name__, e)

    async def _news(self) -> None:
        """Tell the feed of approvals the store says were updated since the last sweep (how
        an inbox here hears of changes made elsewhere when the store cannot push them, or
        pushed them while this replica was not listening). Rows are read a little before the
        watermark (a transaction may commit after a later one), each (id, updated) once."""
        since = self._updated - NEWS_OVERLAP
        rows = await self.log.call(self.log.reader.updated_since, since)
        for approval_id, updated in rows:
            if (approval_id, updated) not in self._seen:
                self._seen[(approval_id, updated)] = None
                self.feed.publish(approval_id)
            self._updated = max(self._updated, updated)
        self._seen = {k: None for k in self._seen if k[1] > self._updated - NEWS_OVERLAP}

    async def _expire(self) -> None:
        due = await self.log.call(lambda: list(self.log.reader.approvals(states=LIVE, expired_by=time.time())))

        def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
            if a.state not in LIVE or a.expires > time.time():
                return None
            why = ("nobody decided before the approval expired" if a.state == PENDING
                   else "approved, but not executed before the approval expired")
            a.finish(EXPIRED, why)
            return "expired", {"outcome": why}

        for document in due:
            await self._change(document["id"], step)

    async def _abandon_lapsed(self) -> None:
        """Abandon the approvals held by replicas that are gone: nobody may run them now."""
        for approval_id, step in self._lost(await self.log.call(self.log.reader.held_elsewhere, self.me)):
            await self._change(approval_id, step)

    def _lost(self, holders: list[dict[str, Any]], starting: bool = False) -> list[tuple[str, Step]]:
        """For each approval held by a replica that lapsed, the step abandoning it."""
        trust_age = self.log.problem is None and time.time() - self.log.up_since >= self.lease
        found = []
        for holder in holders:
            why = lapsed(holder, self.lease, self.log.replica.host, trust_age, starting)
            if why is not None:
                found.append((holder["approval"], _holder_lost(holder["replica"], why)))
        return found

    async def _notified(self, kind: str, approval: Approval, target: str, error: str | None, **detail: Any) -> None:
        """The notifier's report: every delivery, and every final failure, goes on record."""
        step = "notified" if error is None else "notify_failed"
        await self.log.write([self._event(approval, step, notification=kind, target=target,
                                          **({"error": error} if error else {}), **detail)])

    async def _posted(self, approval_id: str) -> list[tuple[str, str]]:
        """Where the approval's Slack messages are, as recorded when any replica posted them."""
        rows = await self.log.call(self.log.reader.where,
                                   "approval = ? AND kind = 'approval' AND json_extract(detail, '$.step') = 'notified' "
                                   "AND json_extract(detail, '$.notification') = 'pending' "
                                   "AND json_extract(detail, '$.slack_ts') IS NOT NULL", [approval_id])
        return [(d["slack_channel"], d["slack_ts"]) for d in (json.loads(r["detail"]) for r in rows)]

    async def _current(self, approval_id: str) -> Approval:
        """The approval as the store holds it now (a decision made elsewhere included)."""
        return await self.get(approval_id)


def _holder_lost(replica: str | None, why: str) -> Step:
    """Abandon an approval whose flow `replica` held, if it still does."""

    def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
        if not (a.held and a.state in LIVE and (a.replica or None) == replica):
            return None
        a.finish(ABANDONED, why)
        return "abandoned", {"outcome": why, "replica": replica}

    return step


def _ended(why: str) -> Step:
    """Abandon an approval that can still change."""

    def step(a: Approval) -> tuple[str, dict[str, Any]] | None:
        if a.state not in LIVE:
            return None
        a.finish(ABANDONED, why)
        return "abandoned", {"outcome": why}

    return step
