"""provenance: which model output, if any, asked for this request.

Before policy, every request's operation gets `provenance` in its details
(addons/engine/provenance.py): matched against the tool calls that completions recently
asked for, for the same principal and crew run (modelguard remembers them), in the
request's own protocol's normal form (addons/classifiers/forms.py). An MCP batch is
judged message by message; a string of SQL statements or a shell line as the whole the
model wrote. Rules can then require it (`provenance: required`) or hold what lacks it
(`provenance: none`), and the record and the approvers show it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mitmproxy import http

from addons import context, failclosed
from addons.classifiers import forms
from addons.engine import provenance
from addons.engine.config import GATEWAY_CONNECTION
from addons.engine.model import Operation, Principal, Request
from addons.engine.provenance import Ledger, key_of
from addons.failclosed import guarded


class Provenance:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.operation is None or c.principal is None or c.connection == GATEWAY_CONNECTION:
            return
        view = Request(f.request.method, f.request.path, tuple(f.request.headers.items(multi=True)),
                       f.request.get_content(strict=False))
        if c.operation.protocol == "mcp" and c.operation.parts:
            parts = tuple(with_provenance(p, self.judge(p, view, f.request.host, c.principal))
                          for p in c.operation.parts)
            worst = min((p.details["provenance"] for p in parts), key=_rank)
            c.operation = dataclasses.replace(with_provenance(c.operation, worst), parts=parts)
        else:
            c.operation = with_provenance(c.operation, self.judge(c.operation, view, f.request.host, c.principal))

    def judge(self, op: Operation, view: Request, host: str, principal: Principal) -> dict[str, Any]:
        command = None if op.protocol == "llm" else forms.command(op, view, host)
        if command is None:
            return provenance.not_applicable()
        asked = self.ledger.recent(key_of(principal))
        found = provenance.match(command, asked, lambda a: forms.asked_forms(a, host))
        if found is None:
            return provenance.unverified(principal, len(asked))
        return provenance.verified(*found, principal)


def _rank(found: dict[str, Any]) -> int:
    return (provenance.NONE, provenance.NORMALISED, provenance.EXACT, provenance.NOT_APPLICABLE).index(found["match"])


def with_provenance(op: Operation, found: dict[str, Any]) -> Operation:
    """The operation with its provenance, and its parts with the same (the model wrote the
    whole string, line or request)."""
    parts = tuple(dataclasses.replace(p, details={**p.details, "provenance": found}) for p in op.parts)
    return dataclasses.replace(op, details={**op.details, "provenance": found}, parts=parts or op.parts)
