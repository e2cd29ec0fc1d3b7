"""hold: holds a flow that a rule sent for review until named people decide.

The flow is held with `flow.intercept()` (so mitmweb shows it as intercepted, with a comment
naming the rule and the approval) while this hook waits; other flows carry on. The wait
ends when:

- approvers reach quorum: the request is checked against the approved fingerprint (nothing
  about it may have changed), the approval is used up, and the flow goes on upstream;
- approvers deny: 403 with their reason;
- the hold times out: 403 with the approval id and state `pending`; once approved, the same
  principal re-sending the identical request within the approval's TTL goes through once;
- the client goes away: the approval is abandoned and can never execute anything;
- (MCP clients that resume event streams) the flow's keep-alive window ends first: the
  client is told to come back for the answer, and its resumed request (addons/mcpguard.py)
  joins the same approval and waits on;
- the gateway stops (or, to the other replicas, is lost): the approval is abandoned and the
  agent told so;
- a mitmweb operator resumes the flow (approved as the console operator) or kills it
  (denied by the console operator; the agent still gets a 403 rather than a hung socket).

mitmproxy's `flow.kill()` does not release an intercepted flow and mitmproxy has no
intercept timeout, so this addon owns both: every way out sets the answer and resumes.

Before any of that: a review whose rule says `require_justification` refuses a request that
does not say why (403 `justification_required`, saying how to give one), and a request
inside an active time-boxed grant of the same principal, shape and rules goes on without a
new hold, recorded with the grant it used (addons/engine/grants.py).

An MCP call joins a pending approval of the identical call by the same principal that no
flow holds (its hold timed out, or its client came back), instead of opening another: MCP
clients re-send, and one call gets one approval.
"""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum

from mitmproxy import ctx as mctx
from mitmproxy import flow as mflow
from mitmproxy import hooks, http

from addons import classifiers, context, failclosed
from addons.approvalbook import ApprovalBook
from addons.engine import mcp, metrics
from addons.engine.approval import ABANDONED, APPROVED, DENIED, EXPIRED, ApprovalError, fingerprint
from addons.engine.errors import Error
from addons.engine.model import MARKERS, Decision, Request
from addons.engine.store import headers_for_record
from addons.failclosed import guarded
from addons.maskpool import MaskPool
from addons.settings import Settings

POLL = 0.25  # how often a hold looks for a resumed/killed flow or a departed client
KEEPALIVE = "custody.keepalive"
"""flow.metadata: seconds this flow may be held before its client is told to come back (set by mcpguard)."""
RESUME = "custody.resume"
"""flow.metadata: the approval a client that came back for its answer waits on (set by mcpguard)."""


class End(StrEnum):
    """Why a hold stopped waiting, besides the approval's own decision (its state)."""

    KILLED = "killed"  # a mitmweb operator killed the flow: the console operator's denial
    RESUMED = "resumed"  # a mitmweb operator resumed it: the console operator's approval
    GONE = "gone"  # the client went away: the approval is abandoned
    TIMEOUT = "timeout"  # the hold's time ran out: the agent may re-send once it is approved
    BREAK = "break"  # the flow's keep-alive window ended first: the client comes back for the answer


JUSTIFY = ("say why in the X-Custody-Justification header (client helper: custody.justify(\"...\"); CrewAI: "
           "the task, by default; psql: -c custody.justification=...; ssh: CUSTODY_JUSTIFICATION)")

REFUSALS = {DENIED: Error.APPROVAL_DENIED, EXPIRED: Error.APPROVAL_EXPIRED}
"""Decisions the agent learns from the approval's own outcome text."""
ENDED = {**REFUSALS, ABANDONED: Error.APPROVAL_ABANDONED}
"""What an approval that cannot run any more tells the agent, by its state."""


HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authorization", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "host"})


def request_fingerprint(f: http.HTTPFlow, c: context.Context) -> str:
    """The fingerprint of the request as it will go upstream (after identity stripped the
    agent's token and attributes, before the gateway adds its credential). An MCP message is
    bound to what it calls — each message's method, tool or target, and arguments — not to
    its JSON-RPC id or session, which change on every send (addons/engine/mcp.py)."""
    req = f.request
    if c.operation.protocol == "mcp":
        now = classifiers.classify("mcp", c.connection, Request(req.method, req.path, tuple(req.headers.items(multi=True)),
                                                                 req.get_content(strict=False)))
        return fingerprint(c.principal, c.operation.connection, req.method,
                           f"{req.scheme}://{req.host}:{req.port}{req.path.partition('?')[0]}", [], mcp.call_identity(now))
    url = f"{req.scheme}://{req.host}:{req.port}{req.path}"
    headers = [[k, v] for k, v in req.headers.items(multi=True) if k.lower() not in HOP_BY_HOP]
    return fingerprint(c.principal, c.operation.connection, req.method, url, headers, req.get_content(strict=False) or b"")


class Hold:
    def __init__(self, settings: Settings, book: ApprovalBook, pool: MaskPool) -> None:
        self.settings = settings
        self.book = book
        self.pool = pool

    def _show(self, f: http.HTTPFlow, text: str, marker: str) -> None:
        f.comment, f.marked = text, marker
        mctx.master.addons.trigger(hooks.UpdateHook([f]))

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        decision = c.decision
        if decision is None or decision.effect != "review":
            return
        if any(r.require_justification for r in decision.reviews) and not c.principal.attribute("justification"):
            failclosed.refuse(f, 403, f"rules {', '.join(decision.rules)} require a justification: {JUSTIFY}",
                              error=Error.JUSTIFICATION_REQUIRED, rules=decision.rules)
            return
        try:
            granted = await self.book.grant_covering(c.principal, c.operation, decision.rules)
        except Exception as e:
            self._unavailable(f, e, decision)
            return
        if granted is not None:
            c.approval = granted.approval
            c.decision = Decision(effect="allow", rules=decision.rules, masks=decision.masks,
                                  approval=granted.approval, grant=granted.id,
                                  reason=f"inside grant {granted.id} by {', '.join(granted.granted_by)} "
                                         f"(approval {granted.approval})")
            return
        fp = request_fingerprint(f, c)
        if await self._granted(f, c, fp, decision):
            return
        try:
            approval = await self.book.unheld(fp, c.principal, f.metadata.get(RESUME)) if c.protocol == "mcp" else None
            if approval is None:
                approval = await self._open(f, c, decision, fp)
        except Exception as e:  # the approval could not be recorded: nothing is held, nothing goes on
            self._unavailable(f, e, decision)
            return
        c.approval = approval.id
        f.intercept()
        self._show(f, f"custody: held for review · rules {', '.join(decision.rules)} · approval {approval.id}",
                   MARKERS["review"])
        try:
            with metrics.APPROVALS_HELD.track_inprogress():
                outcome = await self._hold(f, approval, f.metadata.get(KEEPALIVE))
            await self._conclude(f, c, approval, decision, outcome, fp)
        finally:
            f.resume()

    async def _open(self, f: http.HTTPFlow, c: context.Context, decision: Decision, fp: str):
        max_body = self.settings.require().store.max_body
        raw = f.request.get_content(strict=False) or b""
        body, withheld = await self.pool.for_record(raw, context.body_type(c, f.request.headers.get("content-type", "")),
                                                    decision.masks)
        await self.pool.fix_record(c)  # the approval shows the operation as it goes on record
        return await self.book.open(
            c.principal, c.recorded_operation,
            {"method": f.request.method, "url": f.request.pretty_url,
             "headers": headers_for_record(f.request.headers.items(multi=True)),  # one pass, as sent
             "body": withheld or (body or b"")[:max_body].decode(errors="replace"), "body_size": len(raw)},
            fp, decision, f.id, c.session,
        )

    def _unavailable(self, f: http.HTTPFlow, e: Exception, decision: Decision) -> None:
        """Refuse: the store could not answer (anything else is a gateway error, re-raised)."""
        if self.book.log.problem is None:
            raise e  # not the store: a gateway error (failclosed.guarded)
        failclosed.refuse(f, 503, f"audit store unavailable ({type(e).__name__}); nothing was forwarded",
                          error=Error.AUDIT_UNAVAILABLE, rules=decision.rules)

    async def _granted(self, f: http.HTTPFlow, c: context.Context, fp: str, decision: Decision) -> bool:
        """Run an approved re-send of exactly this request, once. Another replica may use the
        same approval at the same moment: the one that loses is held anew."""
        grant = await self.book.grant_for(fp, c.principal)
        if grant is None:
            return False
        try:
            await self.book.execute(grant, f.id, late=True)
        except ApprovalError:
            return False
        self._allow(c, grant.id, decision, grant.outcome)
        return True

    async def _hold(self, f: http.HTTPFlow, approval, keepalive: float | None) -> str:
        waiter = self.book.waiter(approval.id)
        window = time.time() + keepalive if keepalive else float("inf")
        while True:
            if waiter.done():
                return waiter.result()
            if f.error is not None and f.error.msg == mflow.Error.KILLED_MESSAGE:
                return End.KILLED
            if not f.intercepted:
                return End.RESUMED
            if f.client_conn.timestamp_end is not None:
                return End.GONE
            remaining = approval.hold_until - time.time()
            if remaining <= 0:
                return End.TIMEOUT
            if time.time() >= window:
                return End.BREAK
            await asyncio.wait([waiter], timeout=min(remaining, POLL, max(window - time.time(), 0)))

    async def _conclude(self, f, c, approval, decision: Decision, outcome: str, fp: str) -> None:
        if outcome == End.KILLED:
            f.error, f.live = None, True  # answer the agent instead of leaving it hanging
            await self.book.console(approval, "deny")
            outcome = approval.state
        elif outcome == End.RESUMED:
            await self.book.console(approval, "approve")
            outcome = approval.state
        refuse = dict(rules=decision.rules, approval=approval.id)
        if outcome == APPROVED and approval.state != APPROVED:
            failclosed.refuse(f, 403, f"approval {approval.id} is {approval.state}; it can be used only once",
                              error=Error.APPROVAL_USED, extra={"state": approval.state}, **refuse)
            return
        if outcome == APPROVED:
            if request_fingerprint(f, c) != fp:
                failclosed.refuse(f, 403, "the request changed while it was held; it was not sent",
                                  error=Error.APPROVAL_MISMATCH, extra={"state": approval.state}, **refuse)
                return
            try:
                await self.book.execute(approval, f.id, late=False)
            except ApprovalError as e:  # expired or abandoned a moment ago, elsewhere
                failclosed.refuse(f, 403, str(e), error=ENDED.get(approval.state, Error.APPROVAL_USED),
                                  extra={"state": approval.state}, **refuse)
                return
            self._allow(c, approval.id, decision, approval.outcome)
            self._show(f, f"custody: approved · approval {approval.id} · {approval.outcome}", MARKERS["approved"])
        elif outcome in REFUSALS:
            failclosed.refuse(f, 403, approval.outcome, error=REFUSALS[outcome], extra={"state": outcome}, **refuse)
        elif outcome == End.BREAK:
            await self.book.release(approval, "keepalive_ended")  # no flow holds it until the client comes back
            failclosed.refuse(f, 403, f"waiting for approval by {', '.join(approval.approvers())}; still held",
                              error=Error.APPROVAL_PENDING, extra={"state": approval.state, "resume": approval.id},
                              **refuse)
        elif outcome == End.TIMEOUT:
            await self.book.release(approval)
            failclosed.refuse(
                f, 403,
                f"waiting for approval by {', '.join(approval.approvers())}; re-send the identical request once it is approved",
                error=Error.APPROVAL_PENDING, extra={"state": approval.state}, **refuse,
            )
        elif outcome == ABANDONED:  # this gateway is stopping, or another replica gave up on it
            failclosed.refuse(f, 403, approval.outcome, error=Error.APPROVAL_ABANDONED, extra={"state": outcome},
                              **refuse)
        else:
            await self.book.abandon(approval, "the client went away while the request was held")
            failclosed.refuse(f, 403, "abandoned: the client went away", error=Error.APPROVAL_ABANDONED,
                              extra={"state": approval.state}, **refuse)

    @staticmethod
    def _allow(c: context.Context, approval_id: str, decision: Decision, why: str) -> None:
        c.approval = approval_id
        c.decision = Decision(
            effect="allow", rules=decision.rules, reason=f"{why} (approval {approval_id})",
            masks=decision.masks, approval=approval_id,
        )
