"""The approval book: the approvals the gateway knows about, their waiters, expiry and
notifications; a shared service of the chain (no flow hooks).

The book keeps live approvals in memory (votes are counted on the event loop, so two
votes cannot race) and writes every change together with its audit event in one
transaction, so the store always says what the gateway did. What an approval is, and
how votes count, is addons/engine/approval.py. It also keeps the time-boxed grants that
approvals issue (addons/engine/grants.py) and publishes every change on a feed the
approvers' inbox follows (addons/engine/feed.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
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
from addons.engine.store import Event, put_approval, put_grant
from addons.settings import Settings

logger = logging.getLogger(__name__)


class ApprovalBook:
    """The approvals the gateway knows about, their waiters, expiry and notifications."""

    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings = settings
        self.log = log
        self.live: dict[str, Approval] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.grants: dict[str, Grant] = {}
        self.feed = Feed()
        self.notifier: Notifier | None = None
        self._sweeper: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            cfg = self.settings.require()
            self.notifier = Notifier(cfg.approvals, self._notified, self._posted)

    async def running(self) -> None:
        await self._restore()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    # persistence

    async def _save(self, approval: Approval, step: str, actor: Principal | None = None, grant: Grant | None = None,
                    **detail: Any) -> None:
        """Write the approval's new state (and the grant it issues or ends) and the event
        recording the step, atomically; then tell the feed."""
        effect = {APPROVED: "allow", EXECUTED: "allow", DENIED: "deny"}.get(approval.state)
        event = Event(
            id=new_id(),
            kind="approval",
            session=approval.session,
            flow=approval.flow,
            principal=actor or approval.requester,
            operation=approval.operation,
            decision=Decision(effect, tuple(approval.rules), approval.outcome or approval.reason,
                              approval=approval.id) if effect else None,
            approval=approval.id,
            detail={"step": step, "state": approval.state, "fingerprint": approval.fingerprint, **detail,
                    **({"grant": grant.document()} if grant else {})},
        )
        write = put_approval(approval.row())
        if grant is not None:
            also = put_grant(grant.row())
            await self.log.write([event], lambda conn: (write(conn), also(conn)))
        else:
            await self.log.write([event], write)
        self.feed.publish(approval.id)

    async def _restore(self) -> None:
        """After a restart: keep what can still happen, abandon what was being held."""
        for document in self.log.reader.approvals(states=LIVE):
            approval = Approval.from_document(document)
            if approval.held:  # its flow died with the old process: nothing may run it now
                await self._finish(approval, ABANDONED, "the gateway restarted while the request was held",
                                   step="abandoned")
            else:
                self.live[approval.id] = approval
        for document in self.log.reader.grants(active_at=time.time()):
            grant = Grant.from_document(document)
            self.grants[grant.id] = grant

    # the hold's side

    def grant_covering(self, principal: Principal, operation: Operation, rules: tuple[str, ...]) -> Grant | None:
        """An active time-boxed grant inside which this request falls."""
        now = time.time()
        return next((g for g in self.grants.values() if g.covers(principal, operation, rules, now)), None)

    def grant_for(self, fp: str, principal: Principal) -> Approval | None:
        """An approved, unused, unexpired approval for exactly this request by this principal."""
        now = time.time()
        for a in self.live.values():
            if (a.state == APPROVED and not a.held and a.fingerprint == fp and a.expires > now
                    and (a.requester.subject, a.requester.issuer) == (principal.subject, principal.issuer)):
                return a
        return None

    def unheld(self, fp: str, principal: Principal, approval_id: str | None = None) -> Approval | None:
        """A pending approval of exactly this request by this principal that no flow holds
        (the one `approval_id` names, when given), held again from now."""
        now = time.time()
        for a in self.live.values():
            if (a.state == PENDING and not a.held and a.fingerprint == fp and a.expires > now
                    and approval_id in (None, a.id)
                    and (a.requester.subject, a.requester.issuer) == (principal.subject, principal.issuer)):
                a.held = True
                if a.hold_until <= now:  # its hold timed out: this one lasts as long again
                    a.hold_until = min(a.expires, now + min(r.timeout for r in a.reviews))
                return a
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
        )
        await self._save(approval, "requested", risk=operation.risk, approvers=approval.approvers(),
                         rules=approval.rules, policy=approval.reason)
        self.live[approval.id] = approval  # only once its request is on record
        self.notifier.send("pending", approval)
        return approval

    def waiter(self, approval_id: str) -> asyncio.Future:
        future = self.waiters.get(approval_id)
        if future is None:
            future = self.waiters[approval_id] = asyncio.get_running_loop().create_future()
        return future

    async def release(self, approval: Approval) -> None:
        """The hold timed out: the agent was told it is pending; it may come back once approved."""
        approval.held = False
        self.waiters.pop(approval.id, None)
        await self._save(approval, "hold_timeout")

    async def execute(self, approval: Approval, flow: str, late: bool) -> None:
        """Use the approval, once: the flow it belongs to (or its identical replay) goes upstream.
        The state changes before anything is awaited, so no second flow can use it."""
        if approval.state != APPROVED:
            raise ApprovalError(409, Error.NOT_APPROVED, f"approval {approval.id} is {approval.state}, not approved")
        approval.state, approval.executed, approval.held = EXECUTED, time.time(), False
        self.live.pop(approval.id, None)
        self.waiters.pop(approval.id, None)
        await self._save(approval, "executed", executed_flow=flow, late=late)

    async def abandon(self, approval: Approval, why: str) -> None:
        await self._finish(approval, ABANDONED, why, step="abandoned")

    async def _finish(self, approval: Approval, state: str, why: str, step: str,
                      actor: Principal | None = None, **detail: Any) -> None:
        approval.state, approval.outcome, approval.decided = state, why, time.time()
        if state != APPROVED:
            approval.held = False  # an approved hold stays the held flow's until it runs
        if state not in LIVE:
            self.live.pop(approval.id, None)
        grant = issued(approval, approval.decided) if state == APPROVED else None
        await self._save(approval, step, actor, grant=grant, outcome=why, **detail)
        if grant is not None:
            self.grants[grant.id] = grant
        future = self.waiters.pop(approval.id, None)
        if future is not None and not future.done():
            future.set_result(state)
        kind = "decided" if state in (APPROVED, DENIED) else "expired"
        self.notifier.send(kind, approval)

    # the approvers' side

    def get(self, approval_id: str) -> Approval:
        if approval_id in self.live:
            return self.live[approval_id]
        document = self.log.reader.approval(approval_id)
        if document is None:
            raise ApprovalError(404, Error.NOT_FOUND, f"no approval {approval_id}")
        return Approval.from_document(document)

    def timeline(self, approval_id: str) -> list[dict[str, Any]]:
        """Every audit event of the approval and of the flows it belongs to, in time order
        (a request is recorded once decided, after the time it arrived)."""
        rows = sorted(self.log.reader.where("approval = ?", [approval_id]), key=lambda e: (e["ts"], e["seq"]))
        return [
            {"seq": e["seq"], "ts": e["ts"], "kind": e["kind"], "subject": e["subject"], "effect": e["effect"],
             "reason": e["reason"], "status": e["status"], "detail": json.loads(e["detail"]) if e["detail"] else {}}
            for e in rows
        ]

    def list(self, state: str | None = None, connection: str | None = None, requester: str | None = None,
             limit: int = 100, viewer: Principal | None = None) -> list[Approval]:
        """Newest first; with `viewer`, only the approvals that principal may see."""
        found = []
        rows = self.log.reader.approvals(states=(state,) if state else (), connection=connection, requester=requester)
        for document in rows:
            approval = self.live.get(document["id"]) or Approval.from_document(document)
            if viewer is None or visible(approval, viewer):
                found.append(approval)
                if len(found) >= limit:
                    break
        return found

    async def vote(self, approval_id: str, voter: Principal, vote: str, reason: str, grant: float = 0.0,
                   via: str = "api") -> Approval:
        """One approver's vote; an approving vote may ask for a time-boxed grant of `grant` seconds."""
        approval = self.live.get(approval_id) or self.get(approval_id)
        check_vote(approval, voter)
        if grant and vote != "approve":
            raise ApprovalError(400, Error.GRANT_NOT_ALLOWED, "only an approving vote can grant")
        if grant:
            check_grant(approval.reviews, grant)
        approval.votes.append(Vote(voter.subject, voter.issuer, list(voter.groups), vote, reason, time.time(),
                                   via=via, grant=grant))
        outcome = tally(approval.reviews, approval.votes)
        extra = {"via": via, **({"grant_asked": grant} if grant else {})}
        if outcome == PENDING:
            await self._save(approval, "vote", voter, vote=vote, reason=reason, **extra)
            self.notifier.send("voted", approval)
        else:
            await self._finish(approval, outcome, describe(approval, outcome), step=outcome, actor=voter,
                               vote=vote, reason=reason, **extra)
        return approval

    # grants

    def list_grants(self, viewer: Principal) -> list[Grant]:
        """Every grant `viewer` may see (its principal's, or those it may revoke), newest first."""
        known = {d["id"]: Grant.from_document(d) for d in self.log.reader.grants()}
        known.update(self.grants)
        return sorted((g for g in known.values() if g.visible(viewer)), key=lambda g: g.created, reverse=True)

    async def revoke(self, grant_id: str, who: Principal, reason: str) -> Grant:
        grant = self.grants.get(grant_id) or next(
            (Grant.from_document(d) for d in self.log.reader.grants() if d["id"] == grant_id), None)
        if grant is None or not grant.visible(who):
            raise ApprovalError(404, Error.NOT_FOUND, f"no grant {grant_id}")
        if not grant.may_revoke(who):
            raise ApprovalError(403, Error.NOT_AN_APPROVER, f"{who.subject} is not an approver of grant {grant_id}")
        if grant.state() != ACTIVE:
            raise ApprovalError(409, Error.GRANT_ENDED, f"grant {grant_id} is {grant.state()} already")
        grant.revoked, grant.revoked_by, grant.reason = time.time(), who.subject, reason
        approval = self.get(grant.approval)
        await self._save(approval, "grant_revoked", who, grant=grant, reason=reason)
        self.grants.pop(grant.id, None)
        return grant

    async def console(self, approval: Approval, vote: str) -> None:
        """mitmweb's operator resumed (approve) or killed (deny) the held flow. A decision
        that was already made stands."""
        if approval.state != PENDING:
            return
        operator = Principal(CONSOLE, "mitmproxy")
        reason = "resumed in the mitmproxy console" if vote == "approve" else "killed in the mitmproxy console"
        approval.votes.append(Vote(CONSOLE, "mitmproxy", [], vote, reason, time.time(), via="console"))
        outcome = tally(approval.reviews, approval.votes)
        await self._finish(approval, outcome, describe(approval, outcome), step=outcome, actor=operator,
                           vote=vote, reason=reason, via="console")

    # expiry

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.settings.require().approvals.sweep)
            now = time.time()
            for approval in [a for a in self.live.values() if a.expires <= now]:
                try:
                    why = ("nobody decided before the approval expired" if approval.state == PENDING
                           else "approved, but not executed before the approval expired")
                    await self._finish(approval, EXPIRED, why, step="expired")
                except Exception:
                    logger.exception("custody: expiring approval %s failed; will retry", approval.id)

    async def _notified(self, kind: str, approval: Approval, target: str, error: str | None, **detail: Any) -> None:
        """The notifier's report: every delivery, and every final failure, goes on record."""
        step = "notified" if error is None else "notify_failed"
        await self._save(approval, step, notification=kind, target=target, **({"error": error} if error else {}),
                         **detail)

    def _posted(self, approval_id: str) -> list[tuple[str, str]]:
        """Where the approval's Slack messages are, as recorded when they were posted."""
        rows = self.log.reader.where("approval = ? AND kind = 'approval' AND json_extract(detail, '$.step') = 'notified' "
                                     "AND json_extract(detail, '$.notification') = 'pending' "
                                     "AND json_extract(detail, '$.slack_ts') IS NOT NULL", [approval_id])
        return [(d["slack_channel"], d["slack_ts"]) for d in (json.loads(r["detail"]) for r in rows)]
