"""Notifications: tell approvers when an approval is pending, decided or expired.

Each configured webhook gets a POST of a generic JSON document. With `approvals.slack`, a
pending approval is also posted to each Slack channel as an interactive message, and every
later change (a vote, the decision from anywhere, expiry) updates each copy in place
(addons/engine/slack.py). Delivery runs in the background with retries and backoff; the
outcome is reported back to be recorded (a Slack message's channel and ts with it, which is
how the replica that makes a later change finds every copy, whichever replica posted it).
Once posted, the message is brought up to date with the approval as the store holds it
then: a decision made on another replica while it was being posted found no copy to
update. A delivery that fails for good is logged and recorded, and never releases or
denies a hold by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from addons.engine import slack
from addons.engine.approval import Approval
from addons.engine.config import ApprovalsConfig, Webhook

logger = logging.getLogger(__name__)

Report = Callable[..., Awaitable[None]]
"""report(kind, approval, target, error, **detail): record one delivery (or its failure)."""
Posted = Callable[[str], Awaitable[list[tuple[str, str]]]]
"""posted(approval_id): the (channel, ts) of every Slack message recorded for the approval."""
Current = Callable[[str], Awaitable[Approval]]
"""current(approval_id): the approval as the store holds it now."""


def links(approval: Approval, public_url: str) -> dict[str, str]:
    page = f"{public_url}/#/approvals/{approval.id}"
    return {
        "page": page,
        "approve": f"{page}/approve",
        "deny": f"{page}/deny",
        "api": f"{public_url}/approvals/{approval.id}",
    }


def generic(kind: str, approval: Approval, public_url: str) -> dict[str, Any]:
    op, who = approval.operation, approval.requester
    return {
        "event": f"approval.{kind}",
        "approval": {
            "id": approval.id,
            "state": approval.state,
            "requester": {"subject": who.subject, "issuer": who.issuer, "groups": list(who.groups),
                          "agent": {**who.asserted, **who.agent}},
            "connection": approval.connection,
            "operation": {"summary": op.summary, "action": op.action, "resource": op.resource, "risk": op.risk},
            "rules": approval.rules,
            "reason": approval.reason,
            "approvers": approval.approvers(),
            "created": approval.created,
            "expires": approval.expires,
            "outcome": approval.outcome,
            "votes": [{"approver": v.approver, "vote": v.vote, "reason": v.reason, "at": v.at, "via": v.via}
                      for v in approval.votes],
        },
        "links": links(approval, public_url),
    }


class Notifier:
    def __init__(self, settings: ApprovalsConfig, report: Report, posted: Posted, current: Current) -> None:
        self.settings = settings
        self.report = report
        self.posted = posted
        self.current = current
        self.slack = slack.SlackApi(settings.slack, settings.timeout) if settings.slack is not None else None
        self.tasks: set[asyncio.Task] = set()
        self._updating: dict[str, asyncio.Lock] = {}

    def _start(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, kind: str, approval: Approval) -> None:
        """Start delivering `kind` for `approval` to every webhook that wants it, and to Slack:
        a new message for `pending`, every copy updated for any other change."""
        for hook in self.settings.webhooks:
            if kind not in hook.events:
                continue
            self._start(self._deliver(hook, kind, approval, generic(kind, approval, self.settings.public_url)))
        if self.slack is not None:
            self._start(self._post(approval) if kind == "pending" else self._update(kind, approval))

    async def _retrying(self, call, *args):
        """`call(*args)` in a thread, with the configured retries and backoff; (result, error)."""
        delay, error = self.settings.backoff, None
        for attempt in range(self.settings.retries + 1):
            try:
                return await asyncio.to_thread(call, *args), None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                logger.warning("custody: %s failed (attempt %d): %s", getattr(call, "__name__", call), attempt + 1, error)
                if attempt < self.settings.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
        return None, error

    async def _post(self, approval: Approval) -> None:
        text, blocks = slack.message(approval, self.settings.public_url)
        lock = self._updating.setdefault(approval.id, asyncio.Lock())
        async with lock:  # a change made here while posting waits, then updates what was posted
            for channel in self.settings.slack.channels:
                posted, error = await self._retrying(self.slack.post, channel, text, blocks)
                await self._report("pending", approval, f"slack:{channel}", error,
                                   **({"slack_channel": posted[0], "slack_ts": posted[1]} if posted else {}))
        try:
            now = await self.current(approval.id)
        except Exception as e:
            logger.warning("custody: reading approval %s after posting it failed: %s", approval.id, e)
            return
        if slack.message(now, self.settings.public_url) != (text, blocks):  # changed meanwhile, maybe elsewhere
            await self._update("voted" if now.state == "pending" else "decided", now)

    async def _update(self, kind: str, approval: Approval) -> None:
        lock = self._updating.setdefault(approval.id, asyncio.Lock())
        async with lock:
            text, blocks = slack.message(approval, self.settings.public_url)
            for channel, ts in await self.posted(approval.id):
                _, error = await self._retrying(self.slack.update, channel, ts, text, blocks)
                await self._report(kind, approval, f"slack:{channel}", error, slack_channel=channel, slack_ts=ts,
                                   updated=True)
        if approval.state not in ("pending", "approved"):
            self._updating.pop(approval.id, None)

    async def _report(self, kind: str, approval: Approval, target: str, error: str | None, **detail: Any) -> None:
        if error is not None:
            logger.error("custody: giving up on %s for approval %s: %s", target, approval.id, error)
        try:
            await self.report(kind, approval, target, error, **detail)
        except Exception:
            logger.exception("custody: recording the notification for approval %s failed", approval.id)

    def _webhook(self, url: str, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), method="POST",
            headers={"content-type": "application/json", "user-agent": "custody"},
        )
        with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
            response.read()

    async def _deliver(self, hook: Webhook, kind: str, approval: Approval, payload: dict[str, Any]) -> None:
        _, error = await self._retrying(self._webhook, hook.url, payload)
        await self._report(kind, approval, hook.url, error)
