"""why: the chain of one event, on one screen — the prompt, the completion that asked for a
command, the command, its decision, its approval, its response.

Asked about any event of an infrastructure request (its request, decision, approval step or
response), it follows the request's provenance to the completion event and the model call
that produced it. Asked about a model call (or its completion), it lists the commands its
tool calls were matched to. Everything is read as recorded (masked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from addons.engine.store import Store
from addons.evidence.timeline import (
    ApprovalStory,
    Record,
    approvals,
    body_text,
    completion_lines,
    decision_line,
    iso,
    model_call_line,
    provenance_line,
    provenance_of,
    records,
)


@dataclass
class Chain:
    """One event's story: its flow, the model call behind it, the commands it led to."""

    event: Record
    flow: list[Record]
    approvals: dict[str, ApprovalStory] = field(default_factory=dict)
    model_call: list[Record] = field(default_factory=list)
    commands: list[list[Record]] = field(default_factory=list)

    @property
    def request(self) -> Record | None:
        return _first(self.flow, "request")

    @property
    def completion(self) -> Record | None:
        return _first(self.model_call, "completion")

    def as_dict(self) -> dict[str, Any]:
        def brief(r: Record | None) -> dict[str, Any] | None:
            return None if r is None else {"id": r["id"], "seq": r["seq"], "kind": r["kind"], "time": iso(r["ts"]),
                                           "operation": r.operation, "detail": r.detail, "effect": r["effect"],
                                           "status": r["status"]}
        return {"event": brief(self.event), "flow": [brief(r) for r in self.flow],
                "provenance": provenance_of(self.request) if self.request else {},
                "model_call": [brief(r) for r in self.model_call],
                "approvals": [a.as_dict() for a in self.approvals.values()],
                "commands": [[brief(r) for r in flow] for flow in self.commands]}


def _first(recs: list[Record], kind: str) -> Record | None:
    return next((r for r in recs if r["kind"] == kind), None)


def _flow(store: Store, flow: str | None) -> list[Record]:
    return list(records(store.where("flow = ?", [flow]))) if flow else []


def find(store: Store, ref: str) -> Record | None:
    """An event by id, or by the sequence number `custody audit tail` prints."""
    row = store.event(ref)
    if row is None and ref.isdigit():
        row = next(iter(store.where("seq = ?", [int(ref)])), None)
    return Record.of(row) if row is not None else None


def chain(store: Store, ref: str) -> Chain | None:
    """The chain of the event `ref`, or None when there is no such event."""
    event = find(store, ref)
    if event is None:
        return None
    flow = _flow(store, event["flow"]) or [event]
    ids = [r["approval"] for r in flow if r["approval"]]
    steps = list(records(store.where("approval = ?", [ids[0]]))) if ids else []
    out = Chain(event, flow, approvals(steps))
    if event["protocol"] == "llm" or event["kind"] == "completion":
        out.model_call = flow
        if (done := out.completion) is not None:
            asked = store.where("kind = 'request' AND json_extract(operation, '$.details.provenance.event') = ?",
                                [done["id"]])
            out.commands = [_flow(store, r["flow"]) for r in asked]
        return out
    found = provenance_of(out.request) if out.request else {}
    if found.get("event") and (done := find(store, found["event"])) is not None:
        out.model_call = _flow(store, done["flow"]) or [done]
    return out


def lines(c: Chain, limit: int = 600) -> list[str]:
    """The chain as text: prompt → completion → command → decision → approval → response."""
    out = [f"why event {c.event['id']} (#{c.event['seq']}, {c.event['kind']}, {iso(c.event['ts'])})"]
    if c.model_call:
        out += _model_call(c, limit)
    if c.event["protocol"] == "llm" or c.event["kind"] == "completion":
        out.append(f"COMMANDS    {len(c.commands)} request(s) the model's tool calls were matched to"
                   + ("" if c.commands else " (none seen by the gateway)"))
        for flow in c.commands:
            out += ["  " + line for line in _command(flow, {}, limit)]
        return out
    found = provenance_of(c.request) if not c.model_call and c.request is not None else {}
    if found.get("match") == "none":
        out.append("PROMPT      none: no model output seen by the gateway asked for this request")
    elif found.get("match") == "unknown":
        out.append(f"PROMPT      unknown: {found.get('reason', '')}")
    return out + _command(c.flow, c.approvals, limit)


def _model_call(c: Chain, limit: int) -> list[str]:
    request = _first(c.model_call, "request")
    out = []
    if request is not None:
        out.append(f"PROMPT      #{request['seq']} {iso(request['ts'])} {request['subject'] or '-'} to "
                   f"{request['connection']}")
        out.append(model_call_line(request, limit))
    if (done := c.completion) is not None:
        first, *rest = completion_lines(done, limit)
        out += [f"COMPLETION  #{done['seq']} {first}", *rest]
    return out


def _command(flow: list[Record], stories: dict[str, ApprovalStory], limit: int) -> list[str]:
    request = _first(flow, "request")
    out = []
    if request is not None:
        d = request.operation.get("details") or {}
        what = d.get("sql") or d.get("line") or f"{request.detail.get('method', '')} {request.detail.get('url', '')}"
        out += [f"COMMAND     #{request['seq']} {iso(request['ts'])} {request['subject'] or '-'} on "
                f"{request['connection']} [{request['protocol']}] {request.operation.get('summary', '')}",
                f"    {' '.join(str(what).split())[:limit]}"]
        if line := provenance_line(provenance_of(request)):
            out.append(f"    {line}")
    for r in flow:
        if r["kind"] == "decision" and r["effect"]:
            out.append(f"DECISION    #{r['seq']} {decision_line(r)}" + (f" → {r['status']}" if r["status"] else ""))
    for story in stories.values():
        out.append(f"APPROVAL    {story.line()}")
    for r in flow:
        if r["kind"] == "response":
            masking = r.detail.get("masking") or {}
            masked = f", masked {masking.get('masked')} value(s)" if masking.get("masked") else ""
            body = " ".join(body_text(r.row, limit).split())
            out.append(f"RESPONSE    #{r['seq']} {r['status']}{masked}" + (f": {body[:limit]}" if body else ""))
    return out
