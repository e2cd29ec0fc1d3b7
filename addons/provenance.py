"""provenance: which model output, if any, asked for this request.

Before policy, every request's operation gets `provenance` in its details
(addons/engine/provenance.py): matched against the tool calls that completions recently
asked for, for the same principal and crew run (modelguard remembers them), in the
request's own protocol's normal form (addons/classifiers/forms.py). An MCP batch is
judged message by message; a string of SQL statements or a shell line as the whole the
model wrote. Rules can then require it (`provenance: required`) or hold what lacks it
(`provenance: none`), and the record and the approvers show it.

A request that matches nothing this replica's model calls asked for is matched again,
by the same rules, against the principal's recent tool calls in the audit store (every
replica's, kept with their completions), read on the store's reader thread, once per
request. When that read fails, the provenance is `unknown` (rules requiring provenance
refuse it: 503 `provenance_unknown`); the next request reads the store again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mitmproxy import http

from addons import context, failclosed
from addons.auditlog import AuditLog
from addons.classifiers import forms
from addons.engine import provenance
from addons.engine.config import GATEWAY_CONNECTION
from addons.engine.model import Operation, Principal, Request
from addons.engine.provenance import PER_KEY, Asked, Key, Ledger, key_of
from addons.failclosed import guarded
from addons.policy import Policy

logger = logging.getLogger(__name__)


class Recall:
    """What models asked a principal and run for, for one request: this replica's ledger,
    and, at the first miss, the store's tool calls (read once)."""

    def __init__(self, ledger: Ledger, stored: Callable[[Key], Awaitable[list[Asked]]], key: Key,
                 everywhere: bool) -> None:
        self.local = ledger.recent(key)
        self.stored, self.key = stored, key
        self.everywhere = everywhere
        """Whether the store's tool calls are read at a miss, or only this replica's ledger answers."""
        self.shared: list[Asked] | None = None
        self.problem = ""

    async def everyone(self) -> list[Asked] | None:
        """Every replica's recent calls, or None when the store cannot be read."""
        if self.shared is None and not self.problem:
            try:
                self.shared = provenance.current(await self.stored(self.key), time.time())
            except Exception as e:
                self.problem = f"{type(e).__name__}: {e}".strip().splitlines()[0]
                logger.warning("custody: the store's tool calls could not be read; provenance unknown: %s",
                               self.problem)
        return self.shared


class Provenance:
    def __init__(self, ledger: Ledger, log: AuditLog, policy: Policy) -> None:
        self.ledger, self.log, self.policy = ledger, log, policy

    def reads_store(self) -> bool:
        """Whether other replicas' tool calls are looked up: only while some rule asks about
        provenance (made for every request, the read cost the lean runner ~40 % of its
        throughput); otherwise this replica's memory answers."""
        return self.policy.rules is None or self.policy.rules.provenance

    async def stored(self, key: Key) -> list[Asked]:
        return await self.log.call(self.log.reader.tool_calls, key, PER_KEY) if self.reads_store() else []

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.operation is None or c.principal is None or c.connection == GATEWAY_CONNECTION:
            return
        view = Request(f.request.method, f.request.path, tuple(f.request.headers.items(multi=True)),
                       f.request.get_content(strict=False))
        recall = Recall(self.ledger, self.stored, key_of(c.principal), self.reads_store())
        if c.operation.protocol == "mcp" and c.operation.parts:
            parts = tuple([with_provenance(p, await judge(p, view, f.request.host, c.principal, recall))
                           for p in c.operation.parts])
            worst = min((p.details["provenance"] for p in parts), key=_rank)
            c.operation = dataclasses.replace(with_provenance(c.operation, worst), parts=parts)
        else:
            found = await judge(c.operation, view, f.request.host, c.principal, recall)
            c.operation = with_provenance(c.operation, found)


async def judge(op: Operation, view: Request, host: str, principal: Principal, recall: Recall) -> dict[str, Any]:
    """The provenance of one command: matched in this replica's ledger, else in the store."""
    command = None if op.protocol == "llm" else forms.command(op, view, host)
    if command is None:
        return provenance.not_applicable()
    found = provenance.match(command, recall.local, lambda a: forms.asked_forms(a, host))
    if found is not None:
        return provenance.verified(*found, principal)
    shared = await recall.everyone()
    if shared is None:
        return provenance.unknown(recall.problem, principal)
    tried = {(a.event, a.call) for a in recall.local}  # matched nothing above: the same answer without them
    found = provenance.match(command, [a for a in shared if (a.event, a.call) not in tried],
                             lambda a: forms.asked_forms(a, host))
    if found is None:
        return provenance.unverified(principal, len(shared), recall.everywhere)
    return provenance.verified(*found, principal)


def _rank(found: dict[str, Any]) -> int:
    return (provenance.UNKNOWN, provenance.NONE, provenance.NORMALISED, provenance.EXACT,
            provenance.NOT_APPLICABLE).index(found["match"])


def with_provenance(op: Operation, found: dict[str, Any]) -> Operation:
    """The operation with its provenance, and its parts with the same (the model wrote the
    whole string, line or request)."""
    parts = tuple(dataclasses.replace(p, details={**p.details, "provenance": found}) for p in op.parts)
    return dataclasses.replace(op, details={**op.details, "provenance": found}, parts=parts or op.parts)
