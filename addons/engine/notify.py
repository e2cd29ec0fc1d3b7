"""Notifications: tell approvers when an approval is pending, decided or expired.

Each configured webhook gets a POST: a generic JSON document, or a Slack-compatible message
(text plus links to approve or deny on the approvals page; the links only open the page,
a person still has to sign in and press the button). Delivery runs in the background with
retries and backoff; the outcome is reported back to be recorded. A delivery that fails for
good is logged and recorded, and never releases or denies a hold by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from addons.engine.approval import Approval
from addons.engine.config import ApprovalsConfig, Webhook

logger = logging.getLogger(__name__)

Report = Callable[[str, "Approval", str, "str | None"], Awaitable[None]]


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


def mrkdwn(text: str) -> str:
    """Agent-supplied text as Slack shows it: no links, no formatting, one line."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "∗").replace("`", "'")


def slack(kind: str, approval: Approval, public_url: str) -> dict[str, Any]:
    op, who = approval.operation, approval.requester
    link = links(approval, public_url)
    model = who.agent.get("model") or who.asserted.get("model")
    agent = f" ({mrkdwn(model)})" if model else ""
    subject, summary, outcome = mrkdwn(who.subject), mrkdwn(op.summary), mrkdwn(approval.outcome)
    headline = {
        "pending": f":hourglass: *{subject}*{agent} wants to `{summary}` (risk {op.risk})",
        "decided": f":white_check_mark: Approval for `{summary}` by *{subject}* is {approval.state}: {outcome}",
        "expired": f":x: Approval for `{summary}` by *{subject}* is {approval.state}: {outcome}",
    }[kind]
    text = (f"{headline}\nRule {mrkdwn(', '.join(approval.rules))}: {mrkdwn(approval.reason)}\n"
            f"Approvers: {mrkdwn(', '.join(approval.approvers()))}")
    if kind == "pending":
        text += f"\n<{link['approve']}|Approve> · <{link['deny']}|Deny> · <{link['page']}|Details>"
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    if kind == "pending":
        blocks.append({"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Approve"}, "style": "primary", "url": link["approve"]},
            {"type": "button", "text": {"type": "plain_text", "text": "Deny"}, "style": "danger", "url": link["deny"]},
        ]})
    return {"text": text, "blocks": blocks}


class Notifier:
    def __init__(self, settings: ApprovalsConfig, report: Report) -> None:
        self.settings = settings
        self.report = report
        self.tasks: set[asyncio.Task] = set()

    def send(self, kind: str, approval: Approval) -> None:
        """Start delivering `kind` for `approval` to every webhook that wants it."""
        for hook in self.settings.webhooks:
            if kind not in hook.events:
                continue
            render = slack if hook.format == "slack" else generic
            payload = render(kind, approval, self.settings.public_url)
            task = asyncio.ensure_future(self._deliver(hook, kind, approval, payload))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _post(self, url: str, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            url, data=json.dumps(payload).encode(), method="POST",
            headers={"content-type": "application/json", "user-agent": "custody"},
        )
        with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
            response.read()

    async def _deliver(self, hook: Webhook, kind: str, approval: Approval, payload: dict[str, Any]) -> None:
        delay, error = self.settings.backoff, None
        for attempt in range(self.settings.retries + 1):
            try:
                await asyncio.to_thread(self._post, hook.url, payload)
                error = None
                break
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                logger.warning("custody: webhook %s failed (attempt %d): %s", hook.url, attempt + 1, error)
                if attempt < self.settings.retries:
                    await asyncio.sleep(delay)
                    delay *= 2
        if error is not None:
            logger.error("custody: giving up on webhook %s for approval %s: %s", hook.url, approval.id, error)
        try:
            await self.report(kind, approval, hook.url, error)
        except Exception:
            logger.exception("custody: recording the notification for approval %s failed", approval.id)
