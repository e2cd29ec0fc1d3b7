"""approverapi: where approvers act, served by the chain on the gateway's own host.

    GET  /approvals?state=pending&connection=…&requester=…   list, newest first
    GET  /approvals/ID                                         one, with its audit timeline
    POST /approvals/ID/approve   {"reason": "…"}               vote to approve
    POST /approvals/ID/deny      {"reason": "…"}               vote to deny (a reason is required)

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
from addons.engine.approval import ApprovalError, visible
from addons.engine.config import GATEWAY_CONNECTION
from addons.engine.errors import Error
from addons.failclosed import guarded
from addons.settings import Settings

ROUTE = re.compile(r"^/approvals(?:/(?P<id>[0-9a-f]{20,40})(?:/(?P<action>approve|deny))?)?/?$")


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
        route = ROUTE.match(path)
        if route is None:
            failclosed.refuse(f, 404, f"no such gateway endpoint: {path}", error=Error.NOT_FOUND)
            return
        try:
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

    async def _route(self, f: http.HTTPFlow, c: context.Context, approval_id: str | None, action: str | None):
        method = f.request.method
        if approval_id is None and method == "GET":
            q = f.request.query
            limit = min(int(q.get("limit", "100")) if q.get("limit", "100").isdigit() else 100, 1000)
            found = await self.book.list(q.get("state"), q.get("connection"), q.get("requester"), limit,
                                         viewer=c.principal)
            return {"approvals": [a.document() for a in found]}
        if approval_id is not None and action is None and method == "GET":
            approval = await self.book.get(approval_id)
            if not visible(approval, c.principal):
                raise ApprovalError(404, Error.NOT_FOUND, f"no approval {approval_id}")
            return {**approval.document(), "timeline": await self.book.timeline(approval_id)}
        if approval_id is not None and action is not None and method == "POST":
            reason = self._reason(f)
            if action == "deny" and not reason:
                raise ApprovalError(400, Error.REASON_REQUIRED, "a denial needs a reason")
            approval = await self.book.vote(approval_id, c.principal, action, reason)
            return approval.document()
        raise ApprovalError(405, Error.METHOD_NOT_ALLOWED, f"{method} is not allowed on {f.request.path}")

    @staticmethod
    def _reason(f: http.HTTPFlow) -> str:
        content = f.request.get_content(strict=False) or b""
        if not content.strip():
            return ""
        try:
            body = json.loads(content)
        except ValueError:
            raise ApprovalError(400, Error.BAD_REQUEST, "the body must be JSON: {\"reason\": \"...\"}") from None
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            raise ApprovalError(400, Error.BAD_REQUEST, "reason must be a string")
        return reason.strip()[:2000]
