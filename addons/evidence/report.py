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
from addons.evidence.timeline import ApprovalStory, Record, approvals, iso, records

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
    }


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
                           ("masked_values", "values masked"))
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
        "</body></html>\n",
    ])
