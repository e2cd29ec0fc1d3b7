"""Approvals: the review of one exact operation, from request to execution.

An Approval is bound to a fingerprint of the principal, the connection and the exact
request (method, normalised URL, body digest). Its life:

    pending ──quorum──▶ approved ──executed once──▶ executed
       │  └─denials──▶ denied          └──ttl──▶ expired (never used)
       ├──ttl──▶ expired
       └──client gone while held──▶ abandoned

Votes come from principals named by the rules' approvers (`group:…`, `subject:…`); the
requester, or anyone presenting the requester's token, can never vote; one approver counts
once; every review rule that matched must reach its own quorum, and any one reaching its
denial count denies. The book keeps live approvals in memory (votes are counted on the
event loop, so two votes cannot race) and writes every change together with its audit
event in one transaction, so the store always says what the gateway did.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from addons.auditlog import AuditLog
from addons.context import Decision, Operation, Principal, Review, canonical_json, new_id
from addons.notify import Notifier
from addons.settings import Settings
from addons.store import Event

logger = logging.getLogger(__name__)

PENDING, APPROVED, DENIED, EXPIRED, ABANDONED, EXECUTED = (
    "pending", "approved", "denied", "expired", "abandoned", "executed",
)
LIVE = (PENDING, APPROVED)
CONSOLE = "console-operator"


class ApprovalError(Exception):
    """A vote or lookup that cannot be done: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


def fingerprint(principal: Principal, connection: str, method: str, url: str, headers: list[list[str]],
                body: bytes) -> str:
    """What an approval is bound to: who, where, and the exact request: method, URL as
    sent, every header that reaches the upstream, and the body."""
    return hashlib.sha256(
        canonical_json({
            "subject": principal.subject,
            "issuer": principal.issuer,
            "connection": connection,
            "method": method.upper(),
            "url": url,
            "headers": sorted([k.lower(), v] for k, v in headers),
            "body": hashlib.sha256(body).hexdigest(),
        }).encode()
    ).hexdigest()


def eligible(review: Review, subject: str, groups: tuple[str, ...]) -> bool:
    for approver in review.approvers:
        kind, _, name = approver.partition(":")
        if kind == "group" and name in groups:
            return True
        if kind == "subject" and fnmatch.fnmatchcase(subject, name):
            return True
    return False


@dataclass
class Vote:
    approver: str
    issuer: str
    groups: list[str]
    vote: str  # approve | deny
    reason: str
    at: float
    via: str = "api"  # api | console


def tally(reviews: list[Review], votes: list[Vote]) -> str:
    """approved when every review has its quorum, denied when any has its denials."""
    if any(v.via == "console" for v in votes):
        return APPROVED if votes[-1].vote == "approve" else DENIED
    outcome = APPROVED
    for review in reviews:
        counted = [v for v in votes if eligible(review, v.approver, tuple(v.groups))]
        if sum(v.vote == "deny" for v in counted) >= review.denials:
            return DENIED
        if sum(v.vote == "approve" for v in counted) < review.approvals:
            outcome = PENDING
    return outcome


def describe(approval: Approval, outcome: str) -> str:
    """"approved by alice, bob" / "denied by carol: too many units"."""
    wanted = "approve" if outcome == APPROVED else "deny"
    votes = [v for v in approval.votes if v.vote == wanted]
    reasons = "; ".join(v.reason for v in votes if v.reason)
    verb = "approved" if outcome == APPROVED else "denied"
    return f"{verb} by {', '.join(v.approver for v in votes)}" + (f": {reasons}" if reasons else "")


@dataclass
class Approval:
    id: str
    state: str
    created: float
    requester: Principal
    operation: Operation
    request: dict[str, Any]
    fingerprint: str
    rules: list[str]
    reason: str
    reviews: list[Review]
    hold_until: float
    expires: float
    held: bool = True
    votes: list[Vote] = field(default_factory=list)
    decided: float | None = None
    executed: float | None = None
    outcome: str = ""
    flow: str = ""
    session: str = ""

    @property
    def connection(self) -> str:
        return self.operation.connection

    def approvers(self) -> list[str]:
        return sorted({a for r in self.reviews for a in r.approvers})

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "requester": self.requester.as_dict(),
            "connection": self.connection,
            "operation": self.operation.as_dict(),
            "request": self.request,
            "fingerprint": self.fingerprint,
            "rules": self.rules,
            "reason": self.reason,
            "reviews": [r.as_dict() for r in self.reviews],
            "approvers": self.approvers(),
            "hold_until": self.hold_until,
            "expires": self.expires,
            "held": self.held,
            "votes": [asdict(v) for v in self.votes],
            "decided": self.decided,
            "executed": self.executed,
            "outcome": self.outcome,
            "flow": self.flow,
            "session": self.session,
        }

    @classmethod
    def from_document(cls, d: dict[str, Any]) -> Approval:
        p = d["requester"]
        return cls(
            id=d["id"],
            state=d["state"],
            created=d["created"],
            requester=Principal(p["subject"], p["issuer"], tuple(p["groups"]), p["agent"], p["asserted"],
                                p["token_id"], p["token_fingerprint"]),
            operation=Operation(**d["operation"]),
            request=d["request"],
            fingerprint=d["fingerprint"],
            rules=d["rules"],
            reason=d["reason"],
            reviews=[Review(tuple(r["approvers"]), r["approvals"], r["denials"], r["timeout"], r["ttl"])
                     for r in d["reviews"]],
            hold_until=d["hold_until"],
            expires=d["expires"],
            held=d["held"],
            votes=[Vote(**v) for v in d["votes"]],
            decided=d["decided"],
            executed=d["executed"],
            outcome=d["outcome"],
            flow=d["flow"],
            session=d["session"],
        )

    def row(self) -> tuple:
        return (self.id, self.state, self.created, time.time(), self.requester.subject, self.connection,
                self.fingerprint, int(self.held), self.expires, canonical_json(self.document()))


def visible(approval: Approval, who: Principal) -> bool:
    """Approvals show request bodies: only their approvers and their requester see them."""
    requester = approval.requester
    return (who.subject, who.issuer) == (requester.subject, requester.issuer) or any(
        eligible(r, who.subject, who.groups) for r in approval.reviews
    )


def check_vote(approval: Approval, voter: Principal) -> None:
    """Raise ApprovalError unless `voter` may vote on `approval` now."""
    if approval.state != PENDING:
        raise ApprovalError(409, "not_pending", f"approval {approval.id} is {approval.state}, not pending")
    requester = approval.requester
    if (voter.subject, voter.issuer) == (requester.subject, requester.issuer) or (
        voter.token_fingerprint and voter.token_fingerprint == requester.token_fingerprint
    ):
        raise ApprovalError(403, "self_approval", "the requester cannot approve or deny their own request")
    if any((v.approver, v.issuer) == (voter.subject, voter.issuer) for v in approval.votes):
        raise ApprovalError(409, "already_voted", f"{voter.subject} has already voted on approval {approval.id}")
    if not any(eligible(r, voter.subject, voter.groups) for r in approval.reviews):
        raise ApprovalError(
            403, "not_an_approver",
            f"{voter.subject} is not an approver for this request (approvers: {', '.join(approval.approvers())})",
        )


class ApprovalBook:
    """The approvals the gateway knows about, their waiters, expiry and notifications."""

    def __init__(self, settings: Settings, log: AuditLog) -> None:
        self.settings = settings
        self.log = log
        self.live: dict[str, Approval] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.notifier: Notifier | None = None
        self._sweeper: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if "custody_config" in updated:
            cfg = self.settings.require()
            self.notifier = Notifier(cfg.approvals, self._notified)

    async def running(self) -> None:
        await self._restore()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    # persistence

    async def _save(self, approval: Approval, step: str, actor: Principal | None = None, **detail: Any) -> None:
        """Write the approval's new state and the event recording the step, atomically."""
        row = approval.row()

        def apply(conn) -> None:
            conn.execute("INSERT OR REPLACE INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

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
            detail={"step": step, "state": approval.state, "fingerprint": approval.fingerprint, **detail},
        )
        await self.log.write([event], apply)

    async def _restore(self) -> None:
        """After a restart: keep what can still happen, abandon what was being held."""
        rows = self.log.reader.db.execute(
            "SELECT document FROM approvals WHERE state IN (?, ?)", LIVE
        ).fetchall()
        for (document,) in rows:
            approval = Approval.from_document(json.loads(document))
            if approval.held:  # its flow died with the old process: nothing may run it now
                await self._finish(approval, ABANDONED, "the gateway restarted while the request was held",
                                   step="abandoned")
            else:
                self.live[approval.id] = approval

    # the hold's side

    def grant_for(self, fp: str, principal: Principal) -> Approval | None:
        """An approved, unused, unexpired approval for exactly this request by this principal."""
        now = time.time()
        for a in self.live.values():
            if (a.state == APPROVED and not a.held and a.fingerprint == fp and a.expires > now
                    and (a.requester.subject, a.requester.issuer) == (principal.subject, principal.issuer)):
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
            raise ApprovalError(409, "not_approved", f"approval {approval.id} is {approval.state}, not approved")
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
        await self._save(approval, step, actor, outcome=why, **detail)
        future = self.waiters.pop(approval.id, None)
        if future is not None and not future.done():
            future.set_result(state)
        kind = "decided" if state in (APPROVED, DENIED) else "expired"
        self.notifier.send(kind, approval)

    # the approvers' side

    def get(self, approval_id: str) -> Approval:
        if approval_id in self.live:
            return self.live[approval_id]
        row = self.log.reader.db.execute("SELECT document FROM approvals WHERE id = ?", [approval_id]).fetchone()
        if row is None:
            raise ApprovalError(404, "not_found", f"no approval {approval_id}")
        return Approval.from_document(json.loads(row[0]))

    def timeline(self, approval_id: str) -> list[dict[str, Any]]:
        """Every audit event of the approval and of the flows it belongs to, in order."""
        rows = self.log.reader.where("approval = ?", [approval_id])
        return [
            {"seq": e["seq"], "ts": e["ts"], "kind": e["kind"], "subject": e["subject"], "effect": e["effect"],
             "reason": e["reason"], "status": e["status"], "detail": json.loads(e["detail"]) if e["detail"] else {}}
            for e in rows
        ]

    def list(self, state: str | None = None, connection: str | None = None, requester: str | None = None,
             limit: int = 100, viewer: Principal | None = None) -> list[Approval]:
        """Newest first; with `viewer`, only the approvals that principal may see."""
        clauses, args = [], []
        for column, value in (("state", state), ("connection", connection), ("subject", requester)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = " AND ".join(clauses) or "1"
        rows = self.log.reader.db.execute(
            f"SELECT id, document FROM approvals WHERE {where} ORDER BY created DESC", args
        )
        found = []
        for approval_id, document in rows:
            approval = self.live.get(approval_id) or Approval.from_document(json.loads(document))
            if viewer is None or visible(approval, viewer):
                found.append(approval)
                if len(found) >= limit:
                    break
        return found

    async def vote(self, approval_id: str, voter: Principal, vote: str, reason: str) -> Approval:
        approval = self.live.get(approval_id) or self.get(approval_id)
        check_vote(approval, voter)
        approval.votes.append(Vote(voter.subject, voter.issuer, list(voter.groups), vote, reason, time.time()))
        outcome = tally(approval.reviews, approval.votes)
        if outcome == PENDING:
            await self._save(approval, "vote", voter, vote=vote, reason=reason)
        else:
            await self._finish(approval, outcome, describe(approval, outcome), step=outcome, actor=voter,
                               vote=vote, reason=reason)
        return approval

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

    async def _notified(self, kind: str, approval: Approval, target: str, error: str | None) -> None:
        """The notifier's report: every delivery, and every final failure, goes on record."""
        step = "notified" if error is None else "notify_failed"
        await self._save(approval, step, notification=kind, target=target, **({"error": error} if error else {}))
