"""Approvals in Slack: interactive messages, the checks on Slack's button clicks, and the
Web API calls (the Slack SDK's WebClient, pointed anywhere with `api_url`).

A pending approval is posted to every configured channel as a message saying who (the
requester and its groups), which agent and model (verified, and what the agent says about
itself, labelled), the exact operation, its risk, the rules and why, the agent's
justification, and who may decide — with a reason box and Approve / Deny buttons (and
"Approve for N min" when the rules allow time-boxed grants). Once the approval is decided,
from wherever (Slack, the page, the CLI, the console, or nobody before it expired), every
copy is updated in place to say what happened and loses its buttons, so no stale button is
left to press; one pressed anyway is answered with what already happened.

A click counts only when Slack signed it (HMAC-SHA256 of `v0:timestamp:body` with the
app's signing secret, checked by the SDK's SignatureVerifier), its timestamp is within five
minutes, and the same signed request has not been seen before by any replica (the audit
store notes each one until its timestamp is out of the window). Agent-supplied text never
becomes links or formatting: `mrkdwn` escapes it. The SDK is imported when Slack is configured.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from addons.engine.approval import APPROVED, PENDING, Approval
from addons.engine.config import SlackSettings
from addons.engine.grants import grant_limit

WINDOW = 300  # seconds a signed request's timestamp may be from now (Slack's own rule)
ACTIONS = ("approve", "deny", "approve_grant")
REASON_BLOCK, REASON_ACTION, VOTE_BLOCK = "custody_reason", "reason", "custody_vote"
MAX_TEXT = 2900  # a section's text is limited to 3000 characters


class SlackError(Exception):
    """A request that is not Slack's (or not one we can read); the message says which check."""


def mrkdwn(text: Any) -> str:
    """Agent-supplied text as Slack shows it: no links, no formatting, one line."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "∗").replace("`", "'")


def block_text(text: Any) -> str:
    """Agent-supplied text inside a preformatted block: escaped, newlines kept, bounded."""
    text = str(text)[:MAX_TEXT]
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")


def _when(ts: float | None) -> str:
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ts))}>" \
        if ts else "-"


def message(approval: Approval, public_url: str) -> tuple[str, list[dict[str, Any]]]:
    """The message for `approval` as it stands: (fallback text, blocks)."""
    op, who = approval.operation, approval.requester
    verified = ", ".join(f"{k}: {mrkdwn(v)}" for k, v in who.agent.items() if v) or "-"
    says = ", ".join(f"{k}: {mrkdwn(v)}" for k, v in who.asserted.items() if v and k not in who.agent
                     and k != "justification") or "-"
    justification = who.attribute("justification")
    model = who.attribute("model")
    headline = (f"*{mrkdwn(who.subject)}*{f' ({mrkdwn(model)})' if model else ''} wants to "
                f"`{mrkdwn(op.summary)}` (risk {op.risk})")
    state = {PENDING: ":hourglass: waiting for approval"}.get(
        approval.state, f"*{approval.state}*: {mrkdwn(approval.outcome)}")
    text = f"{headline} — {state}"
    detail = approval.request.get("body") if op.protocol in ("http", "mcp", "kubernetes") else None
    exact = (f"{approval.request.get('method', '')} {approval.request.get('url', '')}"
             + (f"\n{detail}" if detail else "")) if detail is not None else op.details.get("sql") or op.details.get(
        "line") or op.summary
    fields = [
        f"*Requester*\n{mrkdwn(who.subject)} ({mrkdwn(', '.join(who.groups)) or 'no groups'})",
        f"*Agent (verified)*\n{verified}",
        f"*Agent says (unverified)*\n{says}",
        f"*Risk*\n{op.risk} ({mrkdwn(op.action)} on {mrkdwn(op.connection)})",
        f"*Rules*\n{mrkdwn(', '.join(approval.rules))}: {mrkdwn(approval.reason)}",
        f"*Approvers*\n{mrkdwn(', '.join(approval.approvers()))}",
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
        {"type": "section", "fields": [{"type": "mrkdwn", "text": f} for f in fields]},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Operation*\n```{block_text(exact)}```"}},
        {"type": "section", "text": {"type": "mrkdwn",
                                     "text": f"*Justification (stated by the agent)*\n{mrkdwn(justification) or '_none given_'}"}},
    ]
    votes = "; ".join(f"{mrkdwn(v.approver)} {v.vote}d via {v.via}" + (f": {mrkdwn(v.reason)}" if v.reason else "")
                      for v in approval.votes)
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text":
                   f"{state} · votes: {votes or 'none yet'} · expires {_when(approval.expires)} · approval {approval.id}"}]})
    page = {"type": "button", "action_id": "details", "text": {"type": "plain_text", "text": "Details"},
            "url": f"{public_url}/#/approvals/{approval.id}"}
    if approval.state == PENDING:
        buttons = [
            {"type": "button", "action_id": "approve", "style": "primary", "value": approval.id,
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": "deny", "style": "danger", "value": approval.id,
             "text": {"type": "plain_text", "text": "Deny"}},
        ]
        if (limit := grant_limit(approval.reviews)) > 0:
            buttons.append({"type": "button", "action_id": "approve_grant", "value": f"{approval.id}:{int(limit)}",
                            "text": {"type": "plain_text", "text": f"Approve for {int(limit // 60)} min"}})
        blocks += [
            {"type": "input", "block_id": REASON_BLOCK, "optional": True, "dispatch_action": False,
             "label": {"type": "plain_text", "text": "Reason (required to deny)"},
             "element": {"type": "plain_text_input", "action_id": REASON_ACTION}},
            {"type": "actions", "block_id": VOTE_BLOCK, "elements": [*buttons, page]},
        ]
    else:
        blocks.append({"type": "actions", "block_id": VOTE_BLOCK, "elements": [page]})
    return text, blocks


def stale(approval: Approval) -> str:
    """What to tell someone who pressed a button of an approval that is decided already."""
    when = approval.decided or approval.executed
    done = {APPROVED: "approved", "executed": "approved and run"}.get(approval.state, approval.state)
    return (f"This request was already {done}" + (f" ({approval.outcome})" if approval.outcome else "")
            + (f" at {time.strftime('%H:%M:%S UTC', time.gmtime(when))}" if when else "") + ". Nothing was changed.")


@dataclass(frozen=True)
class Click:
    """One press of one of our buttons, as Slack describes it."""

    user: str
    team: str
    action: str
    approval: str
    grant: float
    reason: str
    channel: str
    ts: str


def parse(body: bytes) -> Click:
    """The click in an interactivity request body (`payload=` form field, JSON)."""
    try:
        form = urllib.parse.parse_qs(body.decode(), strict_parsing=True)
        payload = json.loads(form["payload"][0])
    except (UnicodeDecodeError, ValueError, KeyError):
        raise SlackError("not an interactivity payload (payload=JSON form field)") from None
    if not isinstance(payload, dict) or payload.get("type") != "block_actions":
        raise SlackError(f"not a button click (type {payload.get('type') if isinstance(payload, dict) else None!r})")
    action = next((a for a in payload.get("actions") or [] if a.get("action_id") in ACTIONS), None)
    if action is None:
        raise SlackError("no Custody action in the click")
    approval, _, seconds = str(action.get("value", "")).partition(":")
    values = ((payload.get("state") or {}).get("values") or {}).get(REASON_BLOCK, {})
    reason = (values.get(REASON_ACTION) or {}).get("value") or ""
    container = payload.get("container") or {}
    return Click(user=str((payload.get("user") or {}).get("id", "")), team=str((payload.get("team") or {}).get("id", "")),
                 action=action["action_id"], approval=approval,
                 grant=float(seconds) if action["action_id"] == "approve_grant" and seconds.isdigit() else 0.0,
                 reason=reason.strip()[:2000], channel=str(container.get("channel_id", "")),
                 ts=str(container.get("message_ts", "")))


class Verifier:
    """Is an interactivity request Slack's, and fresh? (Whether it is new is the store's to say:
    `check` gives the key under which every replica notes it, addons/slackapp.py.)"""

    def __init__(self, signing_secret: str) -> None:
        from slack_sdk.signature import SignatureVerifier

        self.signatures = SignatureVerifier(signing_secret)

    def check(self, body: bytes, timestamp: str, signature: str, now: float | None = None) -> str:
        """The request's replay key, once its signature and timestamp hold; SlackError if not."""
        now = time.time() if now is None else now
        if not timestamp.isdigit() or not signature:
            raise SlackError("not signed by Slack: X-Slack-Request-Timestamp and X-Slack-Signature are required")
        if abs(now - int(timestamp)) > WINDOW:
            raise SlackError(f"the request's timestamp is more than {WINDOW // 60} minutes from now (stale or replayed)")
        if not self.signatures.is_valid(body=body, timestamp=timestamp, signature=signature):
            raise SlackError("bad signature: not signed with this app's signing secret")
        return hashlib.sha256(f"{timestamp}:{signature}".encode()).hexdigest()


REPLAYED = "this signed request was seen already (replayed)"


class SlackApi:
    """The Web API calls Custody makes (blocking: callers on an event loop use a thread)."""

    def __init__(self, settings: SlackSettings, timeout: float = 10.0) -> None:
        from slack_sdk import WebClient

        self.settings = settings
        self.client = WebClient(token=settings.bot_token, base_url=settings.api_url, timeout=int(timeout))

    def post(self, channel: str, text: str, blocks: list[dict[str, Any]]) -> tuple[str, str]:
        answer = self.client.chat_postMessage(channel=channel, text=text, blocks=blocks, unfurl_links=False)
        return str(answer["channel"]), str(answer["ts"])

    def update(self, channel: str, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        self.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)

    def tell(self, channel: str, user: str, text: str) -> None:
        """A message only `user` sees, in `channel` (where they pressed the button)."""
        self.client.chat_postEphemeral(channel=channel, user=user, text=text)

    def email(self, user: str) -> str:
        """The e-mail of a Slack user: the configured mapping, else users.info ("" if none)."""
        mapped = dict(self.settings.users).get(user)
        if mapped:
            return mapped
        from slack_sdk.errors import SlackApiError

        try:
            answer = self.client.users_info(user=user)
        except SlackApiError:
            return ""
        email = ((answer.get("user") or {}).get("profile") or {}).get("email") or ""
        return email.lower()
