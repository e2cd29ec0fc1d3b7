"""approverapi: where approvers act, served by the chain on the gateway's own host.

    GET  /approvals?state=pending&connection=…&requester=…   list, newest first (actionable=1:
                                                               only what the caller can decide now)
    GET  /approvals/events?actionable=1                        the inbox: server-sent events
    GET  /approvals/ID                                         one, with its audit timeline
    POST /approvals/ID/approve   {"reason": "…", "grant": "30m"}  vote to approve (optionally
                                                               answering with a time-boxed grant)
    POST /approvals/ID/deny      {"reason": "…"}               vote to deny (a reason is required)
    GET  /grants                                               time-boxed grants, newest first
    POST /grants/ID/revoke       {"reason": "…"}               end a grant now

The inbox answers each request with the changes since its `Last-Event-ID` (waiting for the
first, up to INBOX_WAIT seconds) and ends the response: mitmproxy sends a locally made
response whole, and EventSource reconnects by itself (after `retry`), so the page stays live
through the proxy and the listener alike.

Callers see only approvals they may act on or asked for themselves (request bodies are in
them). Reachable through the proxy (`http://custody.gateway/…`) and on the listener named by
`approvals.listen` (a mitmproxy reverse-mode listener that browsers open directly). Callers
are identified by the identity addon like everyone else (`Authorization: Bearer` works here)
and every call is recorded; this addon answers them and never lets one go upstream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mitmproxy import ctx, http

from addons import context, failclosed
from addons.approvalbook import ApprovalBook
from addons.engine.approval import Approval, ApprovalError, check_vote, eligible, visible
from addons.engine.config import GATEWAY_CONNECTION, parse_duration
from addons.engine.errors import Error
from addons.engine.model import Principal
from addons.failclosed import guarded
from addons.settings import Settings

ROUTE = re.compile(r"^/(?P<kind>approvals|grants)(?:/(?P<id>[0-9a-f]{20,40})(?:/(?P<action>approve|deny|revoke))?)?/?$")
INBOX = "/approvals/events"
INBOX_WAIT = 25.0
INBOX_RETRY_MS = 250


def valid(kind: str, item: str | None, action: str | None) -> bool:
    """/approvals[/ID[/approve|deny]], /grants and /grants/ID/revoke."""
    if kind == "approvals":
        return action != "revoke"
    return action == "revoke" if item is not None else action is None


def actionable(approval: Approval, who: Principal) -> bool:
    """Can `who` vote on `approval` now?"""
    try:
        check_vote(approval, who)
    except ApprovalError:
        return False
    return True


def inbox_event(mark: str, approval: Approval, who: Principal) -> str:
    """One server-sent event: an approval changed (what a list row shows, and whether the
    reader can decide it now)."""
    data = {"id": approval.id, "state": approval.state, "summary": approval.operation.summary,
            "requester": approval.requester.subject, "risk": approval.operation.risk,
            "justification": approval.requester.attribute("justification"), "actionable": actionable(approval, who)}
    return f"id: {mark}\nevent: approval\ndata: {json.dumps(data)}\n\n"


def reverse_spec(listen: tuple[str, int], gateway_host: str) -> str:
    """The mitmproxy mode for the approvers' listener: everything it receives is ours."""
    host, port = listen
    return f"reverse:http://{gateway_host}@{host}:{port}"


class ApproverAPI:
    def __init__(self, settings: Settings, book: ApprovalBook) -> None:
        self.settings = settings
        self.book = book

    def running(self) -> None:
        """Add the approvers' listener. Only now: mitmdump loads the chain script while its
        servers are being set up, and a mode added before it runs would never listen."""
        cfg = self.settings.require()
        if cfg.approvals.listen is not None:
            spec = reverse_spec(cfg.approvals.listen, cfg.gateway_host)
            if spec not in ctx.options.mode:
                ctx.options.update(mode=[*ctx.options.mode, spec])

    def _answer(self, f: http.HTTPFlow, status: int, document: Any) -> None:
        f.response = http.Response.make(status, json.dumps(document), {"content-type": "application/json"})

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.connection != GATEWAY_CONNECTION:
            return
        path = f.request.path.split("?", 1)[0]
        if path == INBOX and f.request.method == "GET":
            await self._inbox(f, c.principal)
            return
        route = ROUTE.match(path)
        if route is None or not valid(route["kind"], route["id"], route["action"]):
            failclosed.refuse(f, 404, f"no such gateway endpoint: {path}", error=Error.NOT_FOUND)
            return
        try:
            if route["kind"] == "grants":
                document = await self._grants(f, c.principal, route["id"])
            else:
                document = await self._route(f, c, route["id"], route["action"])
        except ApprovalError as e:
            failclosed.refuse(f, e.status, str(e), error=e.error)
            return
        except Exception as e:
            if self.book.log.problem is None:
                raise  # not the store: a gateway error (failclosed.guarded)
            failclosed.refuse(f, 503, f"audit store unavailable ({type(e).__name__}); no vote was counted",
                              error=Error.AUDIT_UNAVAILABLE)
            return
        self._answer(f, 200, document)

    async def _inbox(self, f: http.HTTPFlow, who: Principal) -> None:
        """The changes since Last-Event-ID that `who` may see (with `actionable=1`, only
        approvals `who` is an approver of), as server-sent events."""
        feed = self.book.feed
        last = f.request.headers.get("last-event-id", "")
        mine = f.request.query.get("actionable") in ("1", "true")
        lines = [f"retry: {INBOX_RETRY_MS}\n\n"]
        after = feed.position(last)
        if not last:
            lines.append(f"id: {feed.mark()}\nevent: ready\ndata: {{}}\n\n")  # start from now
        elif after is None:  # another replica's mark, or this one's before a restart
            lines.append(f"id: {feed.mark()}\nevent: reload\ndata: {{}}\n\n")
        else:
            changes, forgotten = await feed.wait(after, INBOX_WAIT)
            if forgotten:
                lines.append(f"id: {feed.mark()}\nevent: reload\ndata: {{}}\n\n")
            seen: dict[str, int] = {}
            for seq, approval_id in changes:
                seen[approval_id] = seq
            for approval_id, seq in sorted(seen.items(), key=lambda kv: kv[1]):
                approval = await self.book.get(approval_id)
                wanted = (any(eligible(r, who.subject, who.groups) for r in approval.reviews)
                          and (who.subject, who.issuer) != (approval.requester.subject, approval.requester.issuer)
                          ) if mine else visible(approval, who)
                if wanted:
                    lines.append(inbox_event(feed.mark(seq), approval, who))
            lines.append(f"id: {feed.mark()}\n\n" if changes or forgotten else f": nothing new\nid: {last}\n\n")
        f.response = http.Response.make(200, "".join(lines), {"content-type": "text/event-stream",
                                                               "cache-control": "no-cache"})

    async def _grants(self, f: http.HTTPFlow, who: Principal, grant_id: str | None):
        method = f.request.method
        if grant_id is None and method == "GET":
            return {"grants": [g.document() for g in await self.book.list_grants(who)]}
        if grant_id is not None and method == "POST":
            reason = self._body(f).get("reason", "")
            return (await self.book.revoke(grant_id, who, reason)).document()
        raise ApprovalError(405, Error.METHOD_NOT_ALLOWED, f"{method} is not allowed on {f.request.path}")

    async def _route(self, f: http.HTTPFlow, c: context.Context, approval_id: str | None, action: str | None):
        method = f.request.method
        if approval_id is None and method == "GET":
            q = f.request.query
            limit = min(int(q.get("limit", "100")) if q.get("limit", "100").isdigit() else 100, 1000)
            found = await self.book.list(q.get("state"), q.get("connection"), q.get("requester"), limit,
                                         viewer=c.principal)
            if q.get("actionable") in ("1", "true"):
                found = [a for a in found if actionable(a, c.principal)]
            return {"approvals": [a.document() for a in found]}
        if approval_id is not None and action is None and method == "GET":
            approval = await self.book.get(approval_id)
            if not visible(approval, c.principal):
                raise ApprovalError(404, Error.NOT_FOUND, f"no approval {approval_id}")
            return {**approval.document(), "timeline": await self.book.timeline(approval_id)}
        if approval_id is not None and action is not None and method == "POST":
            body = self._body(f)
            if action == "deny" and not body["reason"]:
                raise ApprovalError(400, Error.REASON_REQUIRED, "a denial needs a reason")
            approval = await self.book.vote(approval_id, c.principal, action, body["reason"], grant=body["grant"])
            return approval.document()
        raise ApprovalError(405, Error.METHOD_NOT_ALLOWED, f"{method} is not allowed on {f.request.path}")

    @staticmethod
    def _body(f: http.HTTPFlow) -> dict[str, Any]:
        """{"reason": str, "grant": seconds} from the JSON body (both optional)."""
        content = f.request.get_content(strict=False) or b""
        if not content.strip():
            return {"reason": "", "grant": 0.0}
        try:
            body = json.loads(content)
        except ValueError:
            raise ApprovalError(400, Error.BAD_REQUEST, "the body must be JSON: {\"reason\": \"...\"}") from None
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            raise ApprovalError(400, Error.BAD_REQUEST, "reason must be a string")
        grant = body.get("grant") or 0
        try:
            seconds = parse_duration(grant)
        except (ValueError, TypeError):
            raise ApprovalError(400, Error.BAD_REQUEST, "grant must be a duration such as \"30m\"") from None
        return {"reason": reason.strip()[:2000], "grant": seconds}
