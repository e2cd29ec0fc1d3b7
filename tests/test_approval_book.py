"""The approvals book in-process, for what an end-to-end test cannot time: races between a
held flow, a late replay and the console; plus the Slack rendering of hostile input."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from addons.approvalbook import ApprovalBook
from addons.auditlog import AuditLog
from addons.engine.approval import APPROVED, DENIED, EXECUTED, ApprovalError, fingerprint
from addons.engine.config import ApprovalsConfig, StoreConfig
from addons.engine.model import Decision, Operation, Principal, Review
from addons.engine.notify import Notifier
from addons.engine.slack import message as slack_message

REQUESTER = Principal("crew-buyer", "idp", ("buyers",), asserted={"model": "gpt-4o)\n*URGENT* <https://evil.example/login|Approve>"})
MANAGER = Principal("manager-1", "idp", ("managers",))
OPERATION = Operation("http", "api", "write", "/orders", 40, "POST /orders on api")
DECISION = Decision("review", ("orders",), "orders need a manager",
                    reviews=(Review(("group:managers",), approvals=1, timeout=60, ttl=3600),))


@pytest.fixture
def book(tmp_path):
    """The book on the real audit log and store, without a gateway around it."""
    settings = SimpleNamespace(require=lambda: SimpleNamespace(approvals=ApprovalsConfig(None, "http://gw")))
    log = AuditLog(settings)
    log.open(StoreConfig(path=str(tmp_path / "audit.db")))
    b = ApprovalBook(settings, log)
    b.notifier = Notifier(ApprovalsConfig(None, "http://gw"), b._notified, b._posted, b._current)
    yield b
    log.done()


def run(coro):
    return asyncio.run(coro)


def fp(body: bytes = b"{}") -> str:
    return fingerprint(REQUESTER, "api", "POST", "http://api.test:80/orders", [["content-type", "application/json"]], body)


def test_a_held_approval_is_never_given_to_a_replay_and_executes_once(book):
    async def scenario():
        approval = await book.open(REQUESTER, OPERATION, {"body": "{}"}, fp(), DECISION, "flow-1", "s")
        waiter = book.waiter(approval.id)
        await book.vote(approval.id, MANAGER, "approve", "ok")
        assert waiter.result() == APPROVED
        assert await book.grant_for(fp(), REQUESTER) is None  # the held flow owns it
        await book.execute(approval, "flow-1", late=False)
        assert approval.state == EXECUTED
        with pytest.raises(ApprovalError) as e:
            await book.execute(approval, "flow-2", late=True)
        assert e.value.error == "not_approved"
        assert await book.grant_for(fp(), REQUESTER) is None

    run(scenario())


def test_a_released_approval_serves_one_identical_replay(book):
    async def scenario():
        approval = await book.open(REQUESTER, OPERATION, {"body": "{}"}, fp(), DECISION, "flow-1", "s")
        await book.release(approval)  # the hold timed out
        await book.vote(approval.id, MANAGER, "approve", "")
        assert await book.grant_for(fp(b'{"other": 1}'), REQUESTER) is None
        assert await book.grant_for(fp(), MANAGER) is None
        grant = await book.grant_for(fp(), REQUESTER)
        assert grant is approval
        await book.execute(grant, "flow-2", late=True)
        assert await book.grant_for(fp(), REQUESTER) is None

    run(scenario())


def test_the_console_cannot_overturn_a_decision(book):
    async def scenario():
        approval = await book.open(REQUESTER, OPERATION, {"body": "{}"}, fp(), DECISION, "flow-1", "s")
        await book.vote(approval.id, MANAGER, "deny", "no")
        await book.console(approval, "approve")
        assert approval.state == DENIED and [v.vote for v in approval.votes] == ["deny"]

    run(scenario())


def test_a_request_that_could_not_be_recorded_leaves_no_approval(book):
    async def scenario():
        async def failing(change):
            raise RuntimeError("disk full")
        book.log.change = failing
        with pytest.raises(RuntimeError):
            await book.open(REQUESTER, OPERATION, {"body": "{}"}, fp(), DECISION, "flow-1", "s")
        assert book.live == {}

    run(scenario())


@pytest.mark.parametrize("header", [[["x-http-method-override", "DELETE"]], [["authorization", "Bearer mine"]], []])
def test_the_fingerprint_covers_every_header_that_goes_upstream(header):
    base = fingerprint(REQUESTER, "api", "POST", "http://api.test:80/orders", [["content-type", "application/json"]], b"{}")
    other = fingerprint(REQUESTER, "api", "POST", "http://api.test:80/orders",
                        [["content-type", "application/json"], *header], b"{}")
    assert (other == base) is (header == [])


def test_slack_messages_cannot_carry_agent_links_or_formatting(book):
    async def scenario():
        return await book.open(REQUESTER, OPERATION, {"body": "{}"}, fp(), DECISION, "flow-1", "s")

    text, blocks = slack_message(run(scenario()), "http://gw")
    every = json.dumps([text, blocks])
    assert "<https://evil.example" not in every and "*URGENT*" not in every
    assert "&lt;https://evil.example/login|Approve&gt;" in text
    assert "\n" not in text  # the agent's newline did not make a line of its own
