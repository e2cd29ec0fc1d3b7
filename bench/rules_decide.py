"""How long a decision takes with a thousand rules.

Builds a rule set of `--rules` rules spread over 50 connections (paths, groups, methods,
body conditions, a few global deny rules), then decides a mix of requests two ways in the
same run: the baseline evaluates every rule in order; Custody's RuleSet looks candidates up
by (connection, action) first. Both must reach the same decisions. Prints microseconds per
decision (median of repeats) for both and the ratio.

    .venv/bin/python bench/rules_decide.py [--rules 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from addons.classifiers import http as httpops  # noqa: E402
from addons.engine.model import Principal  # noqa: E402
from addons.engine.rules import RuleSet, decide, parse_file  # noqa: E402

ACTIONS = ["read", "write", "delete"]
METHODS = {"read": "GET", "write": "POST", "delete": "DELETE"}


def rule_set(n: int, rng: random.Random) -> list[dict]:
    rules = [
        {"id": "no-admin", "match": {"path": "/admin/**"}, "effect": "deny"},
        {"id": "no-secrets", "match": {"path": "/**/secrets"}, "effect": "deny"},
    ]
    for i in range(n - len(rules)):
        conn = f"svc-{i % 50}"
        action = ACTIONS[i % 3]
        match: dict = {"connection": conn, "action": action, "path": f"/v1/res{i % 17}/**",
                       "principal": {"groups": [f"team-{i % 20}", "ops"]}}
        if i % 7 == 0:
            match["body"] = [{"path": "$.amount", "op": "gt", "value": 1000}]
        effect = "deny" if i % 11 == 0 else ("review" if i % 13 == 0 else "allow")
        rule = {"id": f"r{i}", "match": match, "effect": effect}
        if effect == "review":
            rule["review"] = {"approvers": ["group:leads"]}
        rules.append(rule)
    return rules


def requests(count: int, rng: random.Random) -> list[tuple[Principal, object]]:
    out = []
    for _ in range(count):
        action = rng.choice(ACTIONS)
        body = json.dumps({"amount": rng.choice([10, 5000])}).encode() if action == "write" else None
        op = httpops.classify(f"svc-{rng.randrange(50)}", METHODS[action],
                              f"/v1/res{rng.randrange(18)}/{rng.randrange(1000)}", {"content-type": "application/json"}, body)
        groups = ("ops",) if rng.random() < 0.5 else (f"team-{rng.randrange(25)}",)
        principal = Principal(f"agent-{rng.randrange(100)}", "https://idp", groups)
        out.append((principal, op))
    return out


def timed(fn, cases, repeats: int) -> tuple[float, list]:
    samples, results = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = [fn(p, op) for p, op in cases]
        samples.append((time.perf_counter() - start) / len(cases) * 1e6)
    return statistics.median(samples), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(7)
    ruleset = RuleSet(parse_file({"rules": rule_set(args.rules, rng)}, "bench.yaml"))
    cases = requests(args.requests, rng)

    def baseline(principal, op):
        return decide([r for r in ruleset.rules if r.matches(principal, op)])

    base_us, base_decisions = timed(baseline, cases, args.repeats)
    ours_us, our_decisions = timed(ruleset.decide, cases, args.repeats)
    assert base_decisions == our_decisions, "the index changed a decision"
    effects = {e: sum(d.effect == e for d in our_decisions) for e in ("allow", "review", "deny")}
    print(f"\nRule decisions: {len(ruleset.rules)} rules, {len(cases)} requests ({effects})\n")
    print(f"{'evaluator':<34} {'us/decision':>12} {'ratio':>8}")
    print(f"{'baseline: every rule in order':<34} {base_us:>12.2f} {1:>7.2f}x")
    print(f"{'custody: indexed RuleSet.decide':<34} {ours_us:>12.2f} {base_us / ours_us:>7.2f}x faster")


if __name__ == "__main__":
    main()
