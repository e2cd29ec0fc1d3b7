"""report: the compliance summary of a period — who asked for what, what was refused and
by which rule, who approved what and how long it took, what was masked — as JSON for
machines and a self-contained HTML page (no scripts, no external resources) for people.
"""

from __future__ import annotations

import html
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from addons.engine.config import GATEWAY_CONNECTION
from addons.evidence.timeline import ApprovalStory, Record, approvals, iso, provenance_of, records

UNAUTHENTICATED = "(unauthenticated)"
UNNAMED = "(not stated)"


def _tally(decisions: list[Record], key) -> list[dict[str, Any]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for d in decisions:
        c = counts[key(d)]
        c["requests"] += 1
        c[d["effect"]] += 1
        c["held"] += _held(d)
    return [{"name": name, "requests": c["requests"], "allowed": c["allow"], "denied": c["deny"], "held": c["held"]}
            for name, c in sorted(counts.items(), key=lambda kv: (-kv[1]["requests"], kv[0]))]


def _held(d: Record) -> bool:
    """Held for review: its decision is the approval's outcome (or still `review`)."""
    return d["effect"] == "review" or bool(d["approval"])


def _denial_reason(d: Record) -> list[str]:
    if d.rules:
        return d.rules
    error = (d.detail.get("decision") or {}).get("error")
    return [f"({error})" if error else "(no rule matched: default deny)"]


def build(rows: Iterable[dict[str, Any]], start: float, end: float, chain: dict[str, Any]) -> dict[str, Any]:
    """The report of the events in [start, end)."""
    recs = list(records(rows))
    decisions = [r for r in recs if r["kind"] in ("decision", "connect") and r["effect"]]
    # Approvers' calls to the gateway's own API are not agents' requests: counted apart.
    approver_calls = [r for r in decisions if r["kind"] == "decision" and r["connection"] == GATEWAY_CONNECTION]
    requests = [r for r in decisions if r["kind"] == "decision" and r["connection"] != GATEWAY_CONNECTION]

    def agent(d: Record) -> str:
        return d.attribute("agent") or (UNNAMED if d["subject"] else UNAUTHENTICATED)

    denials = Counter(rule for d in decisions if d["effect"] == "deny" for rule in _denial_reason(d))
    stories: list[ApprovalStory] = [a for a in approvals(recs).values() if a.requested is not None]
    latencies = [a.latency for a in stories if a.latency is not None]
    entities: Counter = Counter()
    fields: Counter = Counter()
    masked_responses = 0
    for r in recs:
        if r["kind"] not in ("response", "session_end"):
            continue
        masking = r.detail.get("masking") or {}
        entities.update(masking.get("entities") or {})
        fields.update(masking.get("fields") or {})
        masked_responses += bool(masking.get("masked"))
    outcomes = Counter(a.outcome for a in stories)
    chains = provenance_chains(recs, stories)
    return {
        "period": {"from": iso(start), "to": iso(end)},
        "chain": chain,
        "totals": {
            "events": len(recs), "requests": len(requests),
            "allowed": sum(d["effect"] == "allow" for d in requests),
            "denied": sum(d["effect"] == "deny" for d in requests),
            "held": sum(_held(d) for d in requests),
            "refused_tunnels": sum(d["effect"] == "deny" for d in decisions if d["kind"] == "connect"),
            "approvals": len(stories), "approver_calls": len(approver_calls), "masked_responses": masked_responses,
            "masked_values": sum(entities.values()) + sum(fields.values()),
            "commands": len(chains), "commands_with_provenance": sum(c["provenance"] in ("exact", "normalised")
                                                                     for c in chains),
        },
        "requests_by_agent": _tally(requests, agent),
        "requests_by_model": _tally(requests, lambda d: d.attribute("model") or UNNAMED),
        "requests_by_connection": _tally(requests, lambda d: d["connection"] or "(none)"),
        "denials_by_rule": [{"rule": k, "denials": v} for k, v in sorted(denials.items(), key=lambda kv: (-kv[1], kv[0]))],
        "approvals": {
            "outcomes": dict(sorted(outcomes.items())),
            "median_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "items": [a.as_dict() for a in sorted(stories, key=lambda a: a.requested)],
        },
        "masking_by_entity": [{"entity": k, "count": v} for k, v in sorted(entities.items(), key=lambda kv: (-kv[1], kv[0]))],
        "masking_by_field": [{"field": k, "count": v} for k, v in sorted(fields.items(), key=lambda kv: (-kv[1], kv[0]))],
        "model_calls": model_calls(recs),
        "provenance": chains,
    }


def model_calls(recs: list[Record]) -> list[dict[str, Any]]:
    """Completions by model: how many, how many tokens, how many tool calls they asked for."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in recs:
        if r["kind"] == "completion":
            c = counts[r.detail.get("model") or r.detail.get("requested") or UNNAMED]
            c["calls"] += 1
            c["input_tokens"] += (r.detail.get("usage") or {}).get("input_tokens", 0)
            c["output_tokens"] += (r.detail.get("usage") or {}).get("output_tokens", 0)
            c["tool_calls"] += len(r.detail.get("tool_calls") or [])
    return [{"model": m, **{k: c[k] for k in ("calls", "input_tokens", "output_tokens", "tool_calls")}}
            for m, c in sorted(counts.items())]


def provenance_chains(recs: list[Record], stories: list[ApprovalStory]) -> list[dict[str, Any]]:
    """Which prompt produced which command: every command of the period with the model
    output that asked for it (or none), its decision, approval and response."""
    by_id = {r["id"]: r for r in recs}
    by_flow: dict[str, dict[str, Record]] = defaultdict(dict)
    for r in recs:
        if r["flow"]:
            by_flow[r["flow"]].setdefault(r["kind"], r)
    outcome = {a.id: a.outcome for a in stories}
    out = []
    for r in recs:
        found = provenance_of(r)
        if r["kind"] != "request" or found.get("match") in (None, "n/a"):
            continue
        completion = by_id.get(found.get("event", ""))
        prompt = by_flow.get(found.get("flow", ""), {}).get("request")
        flow = by_flow.get(r["flow"] or "", {})
        decision, response = flow.get("decision"), flow.get("response")
        out.append({
            "time": iso(r["ts"]), "principal": r["subject"] or "", "connection": r["connection"] or "",
            "command": r.operation.get("summary", ""), "provenance": found["match"],
            "model": found.get("model", ""), "tool_call": found.get("tool_call", ""), "tool": found.get("tool", ""),
            "completion": found.get("completion", "") or found.get("reason", ""),
            "prompt": ((prompt.operation.get("details") or {}).get("last", "") if prompt else "")[:200],
            "completion_event": completion["id"] if completion else found.get("event", ""),
            "decision": decision["effect"] if decision else "", "approval": outcome.get(r["approval"] or "", ""),
            "status": response["status"] if response else None,
        })
    return out


def _table(table_id: str, title: str, columns: list[tuple[str, str]], items: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join(
        "<tr>" + "".join(f'<td data-col="{key}">{html.escape(_cell(item.get(key)))}</td>' for key, _ in columns) + "</tr>"
        for item in items
    ) or f'<tr><td colspan="{len(columns)}" class="none">none</td></tr>'
    return f'<section><h2>{html.escape(title)}</h2><table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></section>'


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "—"
    return str(value)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.1em;margin-top:2em}
.figures{display:flex;gap:1em;flex-wrap:wrap}.figure{border:1px solid #ccc;border-radius:6px;padding:.6em 1em}
.figure b{display:block;font-size:1.6em}table{border-collapse:collapse;min-width:40%}
th,td{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left}td.none{color:#888}
.ok{color:#17702a}.broken{color:#b00020;font-weight:bold}
"""


def render_html(report: dict[str, Any]) -> str:
    t, chain, period = report["totals"], report["chain"], report["period"]
    figures = "".join(
        f'<div class="figure" id="figure-{key}"><b>{t[key]}</b>{html.escape(label)}</div>'
        for key, label in (("requests", "requests"), ("allowed", "allowed"), ("denied", "denied"),
                           ("held", "held for review"), ("approvals", "approvals"),
                           ("masked_values", "values masked"),
                           ("commands_with_provenance", "commands a model asked for"))
    )
    state = (f'<p id="chain" class="ok">Audit chain verified: {chain["events"]} events, head {html.escape(chain["head"])}</p>'
             if chain["ok"] else
             f'<p id="chain" class="broken">Audit chain BROKEN at event {chain.get("broken_at")}: {html.escape(chain.get("problem", ""))}</p>')
    tally = [("name", "name"), ("requests", "requests"), ("allowed", "allowed"), ("denied", "denied"),
             ("held", "held for review")]
    a = report["approvals"]
    return "".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>Custody compliance report {html.escape(period['from'])} – {html.escape(period['to'])}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Custody compliance report</h1><p id=period>{html.escape(period['from'])} to {html.escape(period['to'])}</p>",
        state, f'<div class="figures">{figures}</div>',
        _table("by-agent", "Requests by agent", tally, report["requests_by_agent"]),
        _table("by-model", "Requests by model", tally, report["requests_by_model"]),
        _table("by-connection", "Requests by connection", tally, report["requests_by_connection"]),
        _table("denials", "Denials by rule", [("rule", "rule"), ("denials", "denials")], report["denials_by_rule"]),
        f'<p id="approval-latency">Median approval latency: {_cell(a["median_latency_s"])} s</p>',
        _table("approvals", "Approvals", [("id", "approval"), ("requester", "requester"), ("agent", "agent"),
                                          ("model", "model"), ("connection", "connection"), ("operation", "operation"),
                                          ("justification", "justification"), ("rules", "rules"), ("requested", "requested"), ("approvers", "approvers"),
                                          ("decided", "decided"), ("latency_s", "latency (s)"), ("outcome", "outcome")],
               a["items"]),
        _table("masking", "Masked values by entity", [("entity", "entity"), ("count", "count")], report["masking_by_entity"]),
        _table("masking-fields", "Masked fields by rule path", [("field", "field"), ("count", "count")],
               report["masking_by_field"]),
        _table("model-calls", "Model calls by model", [("model", "model"), ("calls", "calls"),
                                                       ("input_tokens", "input tokens"),
                                                       ("output_tokens", "output tokens"),
                                                       ("tool_calls", "tool calls asked for")], report["model_calls"]),
        _table("provenance", "Which prompt produced which command",
               [("time", "time"), ("principal", "principal"), ("prompt", "prompt (last message)"),
                ("model", "model"), ("completion", "completion"), ("tool_call", "tool call"),
                ("provenance", "provenance"), ("command", "command"), ("decision", "decision"),
                ("approval", "approval"), ("status", "response")], report["provenance"]),
        "</body></html>\n",
    ])
