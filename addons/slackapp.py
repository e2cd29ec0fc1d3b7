"""slackapp: Slack's button clicks on approval messages, at `POST /slack/interactions` on
the gateway's host (the Slack app's interactivity request URL: public_url + that path).

Nobody has a token here, so the request itself must prove it is Slack's: its signature
(the app's signing secret), a timestamp within five minutes, and never seen before by any
replica (addons/engine/slack.py; the audit store notes each signed request, and a store
that cannot say refuses: 503 `audit_unavailable`); anything else is refused (401
`slack_unverified`) and votes nothing. A verified click is a vote by an approver identity, never by a Slack account: the
Slack user's e-mail (the configured mapping, else users.info) must be one an approver used
to sign in with SSO within `slack.signin_max_age`, and the vote is cast as that IdP
identity, with its groups as of that sign-in — so quorum, eligibility and self-approval are
the same rules as everywhere (addons/engine/approval.py). An unmapped user cannot vote.

Slack wants a 200 within three seconds for any click it sent, so a verified click is
answered 200 with what happened in JSON; the person who clicked is told in the channel
(only they see it): recorded, refused and why, or — for a stale button — what already
happened, and the message is brought up to date. Every click is recorded like any request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from mitmproxy import http

from addons import context, failclosed
from addons.approvalbook import ApprovalBook
from addons.auditlog import AuditLog
from addons.engine import slack
from addons.engine.approval import ApprovalError
from addons.engine.config import SlackSettings
from addons.engine.errors import Error
from addons.engine.model import Decision, Principal
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
PATH = "/slack/interactions"


class SlackApp:
    def __init__(self, settings: Settings, book: ApprovalBook, log: AuditLog) -> None:
        self.settings = settings
        self.book = book
        self.log = log
        self.host = ""
        self.public_url = ""
        self.slack: SlackSettings | None = None
        self.verifier: slack.Verifier | None = None
        self.api: slack.SlackApi | None = None

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        cfg = self.settings.require()
        self.host, self.public_url, self.slack = cfg.gateway_host, cfg.approvals.public_url, cfg.approvals.slack
        self.verifier = slack.Verifier(self.slack.signing_secret) if self.slack else None
        self.api = slack.SlackApi(self.slack, cfg.approvals.timeout) if self.slack else None

    def _answer(self, f: http.HTTPFlow, document: dict) -> None:
        f.response = http.Response.make(200, json.dumps(document), {"content-type": "application/json"})

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if (failclosed.answered(f) or f.request.host.lower() != self.host or f.request.method != "POST"
                or f.request.path.split("?", 1)[0] != PATH):
            return
        c = context.of(f)
        if self.verifier is None:
            failclosed.refuse(f, 404, "Slack is not configured (approvals.slack)", error=Error.NOT_FOUND)
            return
        body = f.request.get_content(strict=False) or b""
        try:
            key = self.verifier.check(body, f.request.headers.get("x-slack-request-timestamp", ""),
                                      f.request.headers.get("x-slack-signature", ""))
            click = slack.parse(body)
        except slack.SlackError as e:
            failclosed.refuse(f, 401, str(e), error=Error.SLACK_UNVERIFIED)
            return
        try:
            new = await self.log.call(self.log.reader.first_seen, key, time.time() + 2 * slack.WINDOW)
        except Exception as e:
            failclosed.refuse(f, 503, f"the audit store cannot say whether this click was seen before: {e}",
                              error=Error.AUDIT_UNAVAILABLE)
            return
        if not new:
            failclosed.refuse(f, 401, slack.REPLAYED, error=Error.SLACK_UNVERIFIED)
            return
        c.decision = Decision(effect="allow", reason="a click signed by Slack")
        if self.slack.team and click.team != self.slack.team:
            await self._refused(f, click, Error.UNMAPPED_USER, f"clicks from workspace {click.team} do not count here")
            return
        voter = await self._approver(click.user)
        if voter is None:
            await self._refused(f, click, Error.UNMAPPED_USER,
                                "your Slack account is bound to no approver: sign in to the approvals page with SSO "
                                f"({self.public_url}) using the e-mail Slack has for you, then press again")
            return
        c.principal = voter
        vote = "deny" if click.action == "deny" else "approve"
        if vote == "deny" and not click.reason:
            await self._refused(f, click, Error.REASON_REQUIRED, "a denial needs a reason: type it in the reason box")
            return
        try:
            approval = await self.book.vote(click.approval, voter, vote, click.reason, grant=click.grant, via="slack")
        except ApprovalError as e:
            message = str(e)
            if e.error == Error.NOT_PENDING:
                current = await self.book.get(click.approval)
                message = slack.stale(current)
                self._later(self._refresh(click, current))
            await self._refused(f, click, e.error, message)
            return
        told = f"Recorded: you {vote}d — the request is {approval.state}" + (
            f" ({approval.outcome})" if approval.outcome else "")
        self._later(asyncio.to_thread(self.api.tell, click.channel, click.user, told))
        self._answer(f, {"ok": True, "approval": approval.id, "state": approval.state, "voter": voter.subject})

    async def _approver(self, user: str) -> Principal | None:
        """The approver identity a Slack user votes as, or None: bound by the IdP e-mail of a
        recent enough SSO sign-in."""
        email = await asyncio.to_thread(self.api.email, user)
        found = await self.log.call(self.log.reader.directory, email) if email else None
        if found is None or found["signed_in"] + self.slack.signin_max_age < time.time():
            return None
        return Principal(found["subject"], found["issuer"], tuple(found["groups"]))

    async def _refused(self, f: http.HTTPFlow, click: slack.Click, error: str, message: str) -> None:
        self._later(asyncio.to_thread(self.api.tell, click.channel, click.user, message))
        self._answer(f, {"ok": False, "error": error, "reason": message, "approval": click.approval})

    async def _refresh(self, click: slack.Click, approval) -> None:
        text, blocks = slack.message(approval, self.public_url)
        await asyncio.to_thread(self.api.update, click.channel, click.ts, text, blocks)

    def _later(self, coro) -> None:
        """Tell Slack after answering: it wants the click's answer within three seconds."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or logger.warning("custody: Slack call failed: %s", t.exception()))
