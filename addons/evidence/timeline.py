"""timeline: reading the audit store as evidence — which events a question selects, and
what they say once grouped (a flow's request, decision, approval and response; an
approval's requester, votes and outcome). Replay, the exporters and the report all read
the store through here, so they agree on what an event means.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from addons.engine.model import AGENT_ATTRIBUTES
from addons.engine.store import Store

DECIDED = ("approved", "denied", "expired", "abandoned")
VOTES = ("vote", "approved", "denied")
CHANNELS = {0: "stdin", 1: "stdout", 2: "stderr", 3: "error", 4: "resize"}  # Kubernetes exec streams


def iso(ts: float | None) -> str:
    """UTC, ISO 8601 with milliseconds: the one time format of every export."""
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """`2026-11-29`, `2026-11-29T12:00`, `…Z`/`+01:00` (naive means UTC), or epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass  # not epoch seconds: ISO 8601
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-29T12:00:00Z, or epoch seconds)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


@dataclass(frozen=True)
class Selection:
    """Which events a question is about. Time is [start, end); `effect` selects whole
    flows whose decision had that effect (a denial's request, decision and response)."""

    start: float | None = None
    end: float | None = None
    principal: str = ""
    agent: str = ""
    connection: str = ""
    session: str = ""
    run: str = ""
    effect: str = ""

    def where(self) -> tuple[str, list[Any]]:
        """SQL over `events`. The steps of an approval of a selected flow (votes are the
        approvers' events, not the agent's) are selected with it."""
        timed, targs = [], []
        if self.start is not None:
            timed.append("ts >= ?")
            targs.append(self.start)
        if self.end is not None:
            timed.append("ts < ?")
            targs.append(self.end)
        clauses, args = [], []
        for column, value in (("subject", self.principal), ("agent", self.agent),
                              ("connection", self.connection), ("session", self.session)):
            if value:
                clauses.append(f"{column} = ?")
                args.append(value)
        if self.run:
            clauses.append("(json_extract(principal, '$.agent.run') = ? OR json_extract(principal, '$.asserted.run') = ?)")
            args += [self.run, self.run]
        if self.effect:
            clauses.append("(flow IN (SELECT flow FROM events WHERE kind IN ('decision', 'connect') AND effect = ?)"
                           " OR (kind = 'approval' AND effect = ?))")
            args += [self.effect, self.effect]
        if clauses:
            who = " AND ".join(clauses)
            timed.append(f"(({who}) OR approval IN (SELECT approval FROM events WHERE approval IS NOT NULL AND {who}))")
            targs += args + args
        return " AND ".join(timed) or "1", targs

    def rows(self, store: Store, after: int = 0) -> list[dict[str, Any]]:
        clause, args = self.where()
        return store.where(f"seq > ? AND {clause}", [after, *args])


def loads(value: str | None) -> Any:
    return json.loads(value) if value else None


@dataclass
class Record:
    """One event with its JSON columns parsed."""

    row: dict[str, Any]
    principal: dict[str, Any] = field(default_factory=dict)
    operation: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: dict[str, Any]) -> Record:
        return cls(row, loads(row["principal"]) or {}, loads(row["operation"]) or {}, loads(row["detail"]) or {})

    def __getitem__(self, column: str) -> Any:
        return self.row[column]

    def attribute(self, name: str) -> str:
        """An agent attribute as the gateway saw it: verified claim, else asserted header."""
        return (self.principal.get("agent") or {}).get(name) or (self.principal.get("asserted") or {}).get(name, "")

    def asserted(self) -> list[str]:
        """The agent attributes that only the agent's own headers vouch for."""
        verified = self.principal.get("agent") or {}
        return [n for n in AGENT_ATTRIBUTES if n not in verified and (self.principal.get("asserted") or {}).get(n)]

    @property
    def step(self) -> str:
        return self.detail.get("step", "") if self.row["kind"] == "approval" else ""

    @property
    def approver(self) -> str:
        """Who voted, for an approval step that is a vote (its event names the voter)."""
        return self.row["subject"] or "" if self.step in VOTES else ""

    @property
    def rules(self) -> list[str]:
        return loads(self.row["rules"]) or []


def records(rows: Iterable[dict[str, Any]]) -> Iterator[Record]:
    return (Record.of(r) for r in rows)


@dataclass
class Vote:
    approver: str
    vote: str
    reason: str
    ts: float


@dataclass
class ApprovalStory:
    """One approval as the chain tells it."""

    id: str
    requester: str = ""
    agent: str = ""
    model: str = ""
    task: str = ""
    justification: str = ""
    connection: str = ""
    summary: str = ""
    rules: list[str] = field(default_factory=list)
    requested: float | None = None
    decided: float | None = None
    executed: float | None = None
    outcome: str = "pending"
    why: str = ""
    votes: list[Vote] = field(default_factory=list)
    flows: list[str] = field(default_factory=list)

    @property
    def approvers(self) -> list[str]:
        return [v.approver for v in self.votes if v.vote == "approve"]

    @property
    def latency(self) -> float | None:
        """Seconds from the request for review to its decision."""
        if self.requested is None or self.decided is None:
            return None
        return round(self.decided - self.requested, 3)

    def line(self) -> str:
        """One line for a flow comment or a replay."""
        if self.outcome == "pending":
            return f"approval {self.id} pending"
        who = ", ".join(f"{v.approver} ({v.vote}d {iso(v.ts)}{': ' + v.reason if v.reason else ''})"
                        for v in self.votes) or "nobody"
        return f"approval {self.id} {self.outcome} by {who}" + (f"; executed {iso(self.executed)}" if self.executed else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "requester": self.requester, "agent": self.agent, "model": self.model, "task": self.task,
            "justification": self.justification,
            "connection": self.connection, "operation": self.summary, "rules": self.rules,
            "requested": iso(self.requested), "decided": iso(self.decided), "executed": iso(self.executed),
            "latency_s": self.latency, "outcome": self.outcome, "why": self.why,
            "approvers": self.approvers,
            "votes": [{"approver": v.approver, "vote": v.vote, "reason": v.reason, "at": iso(v.ts)} for v in self.votes],
        }


def approvals(recs: Iterable[Record]) -> dict[str, ApprovalStory]:
    """Every approval the events mention, told from its approval steps."""
    stories: dict[str, ApprovalStory] = {}
    for r in recs:
        if not r["approval"]:
            continue
        a = stories.setdefault(r["approval"], ApprovalStory(r["approval"]))
        if r["flow"] and r["flow"] not in a.flows:
            a.flows.append(r["flow"])
        if r["kind"] != "approval":
            continue
        step = r.step
        if step == "requested":
            a.requester, a.requested = r["subject"] or "", r["ts"]
            a.agent, a.model, a.task = r.attribute("agent"), r.attribute("model"), r.attribute("task")
            a.justification = r.attribute("justification")
            a.connection, a.summary = r["connection"] or "", r.operation.get("summary", "")
            a.rules = r.detail.get("rules") or r.rules
        if step in VOTES and r.detail.get("vote"):
            a.votes.append(Vote(r["subject"] or "", r.detail["vote"], r.detail.get("reason", ""), r["ts"]))
        if not a.rules and r.rules:
            a.rules = r.rules
        if step in DECIDED:
            a.outcome, a.decided, a.why = step, r["ts"], r.detail.get("outcome") or r["reason"] or ""
        if step == "executed":
            a.executed = r["ts"]
            a.outcome = "approved" if a.outcome == "pending" else a.outcome
    return stories


def mcp_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a recorded MCP body (as recorded: masked), JSON or an event stream."""
    text = body_text(row)
    if not text or text.startswith("<"):
        return []
    chunks = [line[5:] for line in text.splitlines() if line.startswith("data:")] or [text]
    found: list[dict[str, Any]] = []
    for chunk in chunks:
        try:
            document = json.loads(chunk)
        except ValueError:
            continue
        found += [m for m in (document if isinstance(document, list) else [document]) if isinstance(m, dict)]
    return found


def tool_calls(rec: Record) -> list[dict[str, Any]]:
    """The MCP tool calls a request event made: tool, action and arguments (as recorded: masked)."""
    if rec["kind"] != "request" or rec.operation.get("protocol") != "mcp":
        return []
    actions = {p.get("resource"): p.get("action") for p in rec.operation.get("parts") or [rec.operation]}
    return [{"tool": m["params"].get("name"), "action": actions.get(m["params"].get("name"), ""), "id": m.get("id"),
             "arguments": m["params"].get("arguments", {})}
            for m in mcp_messages(rec.row) if m.get("method") == "tools/call" and isinstance(m.get("params"), dict)]


def tool_results(rec: Record) -> list[dict[str, Any]]:
    """What the MCP server answered a tool call (as the agent got it: masked): text or error."""
    if rec["kind"] != "response" or (rec.operation.get("details") or {}).get("method") not in ("tools/call", "(batch)"):
        return []
    out = []
    for m in mcp_messages(rec.row):
        if isinstance(m.get("result"), dict) and "content" in m["result"]:
            texts = [c.get("text", f"<{c.get('type')}>") for c in m["result"]["content"] if isinstance(c, dict)]
            out.append({"id": m.get("id"), "error": bool(m["result"].get("isError")), "text": "\n".join(texts)})
        elif isinstance(m.get("error"), dict):
            out.append({"id": m.get("id"), "error": True, "text": f"{m['error'].get('code')}: {m['error'].get('message')}"})
    return out


def provenance_of(rec: Record) -> dict[str, Any]:
    """The provenance the gateway gave a request (addons/engine/provenance.py), or {}."""
    found = (rec.operation.get("details") or {}).get("provenance")
    return found if isinstance(found, dict) else {}


def provenance_line(found: dict[str, Any]) -> str:
    """One line: which model output asked for a request, how it matched, or why none did."""
    if not found or found.get("match") == "n/a":
        return ""
    said = found.get("asserted") or {}
    claim = f" (the request said: {', '.join(f'{k}={v}' for k, v in sorted(said.items()))})" if said else ""
    if found["match"] in ("none", "unknown"):  # nothing asked for it, or the store could not tell
        return f"PROVENANCE {found['match']}: {found.get('reason', '')}{claim}"
    return (f"PROVENANCE {found['match']}: tool call {found.get('tool_call')} ({found.get('tool')}) of completion "
            f"{found.get('event')} by {found.get('model')} on {found.get('connection')}{claim}")


def completion_lines(rec: Record, limit: int = 2000) -> list[str]:
    """A completion event: model, tokens, text (as the agent got it: masked) and tool calls."""
    d = rec.detail
    usage = d.get("usage") or {}
    tokens = f" ({usage.get('input_tokens', '?')} → {usage.get('output_tokens', '?')} tokens)" if usage else ""
    state = "" if d.get("complete", True) else f"  INCOMPLETE: {d.get('error') or 'the stream ended early'}"
    text = " ".join(str(d.get("text") or "").split())
    lines = [f"{d.get('model') or d.get('requested') or '-'}{tokens}{' streamed' if d.get('streamed') else ''}{state}"]
    if text:
        lines.append(f"    > {text[:limit]}")
    for c in d.get("tool_calls") or []:
        invalid = f"  (not remembered: {c['invalid']})" if c.get("invalid") else ""
        arguments = c["arguments"] if isinstance(c.get("arguments"), str) else json.dumps(c.get("arguments"),
                                                                                          ensure_ascii=False)
        lines.append(f"    TOOL CALL {c.get('id') or '(react)'} {c.get('name')} {arguments[:limit]}{invalid}")
    return lines


def model_call_line(rec: Record, limit: int = 2000) -> str:
    """A model call's request: model, endpoint, conversation, tools offered, last message."""
    d = rec.operation.get("details") or {}
    tools = ", ".join(d.get("tools") or []) or "none"
    last = " ".join(str(d.get("last") or "").split())[:limit]
    return (f"    MODEL CALL {d.get('model', '?')} ({d.get('endpoint', '?')}), {d.get('messages', 0)} messages, "
            f"tools offered: {tools}" + (f"; last: {last}" if last else ""))


def decision_line(rec: Record) -> str:
    rules = ",".join(rec.rules) or "-"
    return f"{rec['effect']} · rules {rules} · {rec['reason'] or ''}".rstrip(" ·")


def comment(flow_records: list[Record], stories: dict[str, ApprovalStory]) -> str:
    """The decision and approval of one flow, as mitmweb shows a flow's comment."""
    lines = []
    for r in flow_records:
        if r["kind"] in ("decision", "connect") and r["effect"]:
            lines.append(f"custody: {decision_line(r)} · event {r['id']}")
    for approval_id in dict.fromkeys(r["approval"] for r in flow_records if r["approval"]):
        if approval_id in stories:
            lines.append(stories[approval_id].line())
    return "\n".join(lines)


def by_flow(recs: Iterable[Record]) -> dict[str, list[Record]]:
    flows: dict[str, list[Record]] = {}
    for r in recs:
        if r["flow"]:
            flows.setdefault(r["flow"], []).append(r)
    return flows


def body_text(row: dict[str, Any], limit: int | None = None) -> str:
    body = row["body"]
    if body is None:
        if row["body_size"]:
            return f"<{row['body_size']} bytes, not kept (store.bodies)>"
        return ""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return f"<{len(body)} bytes of binary data>"
    if limit is not None and len(text) > limit:
        return text[:limit] + f"… ({len(text) - limit} more characters)"
    return text


def replay_lines(rec: Record, stories: dict[str, ApprovalStory], body_limit: int = 2000) -> list[str]:
    """A session's timeline, one event at a time: what was asked, by which agent and
    model for which task, what was decided and by whom, and what came back (as masked)."""
    r, when = rec.row, iso(rec["ts"])
    kind = r["kind"]
    if kind == "request":
        who = " ".join(f"{n}={rec.attribute(n)}" for n in ("agent", "model", "run", "task") if rec.attribute(n))
        head = [f"{when}  #{r['seq']} REQUEST   {r['subject'] or '-'} {who}".rstrip(),
                f"    {r['connection']} [{r['protocol']}] {rec.operation.get('summary') or ''}"
                f"  (action {r['action']}, risk {r['risk']})"]
        body = body_text(r, body_limit)
        method, url = rec.detail.get("method", ""), rec.detail.get("url", "")
        calls = [f"    TOOL CALL {c['tool']} ({c['action']}) {json.dumps(c['arguments'], ensure_ascii=False)}"
                 for c in tool_calls(rec)]
        model = [model_call_line(rec, body_limit)] if r["protocol"] == "llm" else []
        origin = [f"    {line}"] if (line := provenance_line(provenance_of(rec))) else []
        return head + [f"    {method} {url}"] + model + origin + calls + \
            ([f"    > {line}" for line in body.splitlines()] if body else [])
    if kind == "completion":
        first, *rest = completion_lines(rec, body_limit)
        return [f"{when}  #{r['seq']} COMPLETION {first}"] + rest
    if kind in ("decision", "connect"):
        if not r["effect"]:
            return []
        status = f" → {r['status']}" if r["status"] else ""
        return [f"{when}  #{r['seq']} DECISION  {decision_line(rec)}{status}"]
    if kind == "approval":
        step = rec.step
        actor = r["subject"] or "-"
        rules = ", ".join(rec.detail.get("rules") or [])
        text = {"requested": f"held for review by {', '.join(rec.detail.get('approvers', []))}"
                             + (f" (rules {rules}: {rec.detail.get('policy', '')})" if rules else ""),
                "vote": f"{actor} voted {rec.detail.get('vote')}",
                "approved": f"approved by {actor}", "denied": f"denied by {actor}",
                "executed": "executed", "hold_timeout": "hold timed out: the agent was told it is pending",
                }.get(step, step)
        reason = rec.detail.get("reason") or (rec.detail.get("outcome", "") if step in ("expired", "abandoned") else "")
        return [f"{when}  #{r['seq']} APPROVAL  {r['approval']}: {text}" + (f" — {reason}" if reason else "")]
    if kind == "response":
        masking = rec.detail.get("masking") or {}
        masked = f"  masked: {json.dumps(masking.get('entities') or masking.get('fields') or {})}" \
            if masking.get("masked") else ""
        body = body_text(r, body_limit)
        results = [f"    TOOL {'ERROR ' if t['error'] else 'RESULT'} {' '.join(t['text'].split())[:body_limit]}".rstrip()
                   for t in tool_results(rec)]
        return [f"{when}  #{r['seq']} RESPONSE  {r['status']}  {rec.detail.get('elapsed_ms', '')} ms{masked}"] + \
            results + [f"    < {line}" for line in body.splitlines()]
    if kind == "message":
        direction = ">" if rec.detail.get("from_client") else "<"
        channel = rec.detail.get("channel")
        row = dict(r, body=r["body"][1:]) if channel is not None and r["body"] else r
        name = CHANNELS.get(channel, f"channel {channel}") if channel is not None else "text"
        return [f"{when}  #{r['seq']} MESSAGE   {name}"] + \
            [f"    {direction} {line}" for line in body_text(row, body_limit).splitlines()]
    if kind == "error":
        return [f"{when}  #{r['seq']} ERROR     {rec.detail.get('error', '')}"]
    if kind == "interrupted":
        tx = rec.detail.get("transaction") or {}
        said = f"; transaction {tx.get('xid') or '(no id)'}: {tx.get('status')}" if tx else ""
        return [f"{when}  #{r['seq']} INTERRUPTED  outcome {rec.detail.get('outcome')}: the gateway stopped before "
                f"the outcome was recorded (replica {rec.detail.get('replica')}: {rec.detail.get('why')}){said}"]
    if kind == "rolled_back":
        return [f"{when}  #{r['seq']} ROLLED BACK  transaction {rec.detail.get('xid')} never committed: the "
                f"{len(rec.detail.get('responses') or [])} responses recorded inside it did not take effect"]
    if kind == "tools":
        removed = "; ".join(f"{t} ({why})" for t, why in (rec.detail.get("removed") or {}).items())
        return [f"{when}  #{r['seq']} TOOLS     offered {len(rec.detail.get('offered', []))} of "
                f"{rec.detail.get('listed', 0)}: {', '.join(rec.detail.get('offered', [])) or '-'}"
                + (f"; held for approval: {', '.join(rec.detail['review'])}" if rec.detail.get("review") else "")
                + (f"; removed: {removed}" if removed else "")]
    if kind in ("tool_pinned", "tool_changed", "tool_refused"):
        d = rec.detail
        text = {"tool_pinned": f"pinned {d.get('tool')} sha256:{d.get('fingerprint', '')}",
                "tool_changed": f"{d.get('tool')} changed: pinned sha256:{d.get('pinned', '')}, "
                                f"listed sha256:{d.get('listed', '')}",
                "tool_refused": f"{d.get('tool')} refused: {d.get('reason', '')}"}[kind]
        return [f"{when}  #{r['seq']} TOOL      {text}"]
    return [f"{when}  #{r['seq']} {kind.upper():<9} {json.dumps(rec.detail, sort_keys=True)[:body_limit]}"]
