"""`custody rules check [PATH …]` and `custody rules explain`.

`check` validates rule files before they are deployed: the live ones the configuration
names, or candidate files and directories given as arguments (the live set is not read
then). `explain` shows the decision for one request and, of the rules that could apply to
its connection, which matched and the first condition of each that did not. Exit status
of explain: 0 allowed, 2 denied or held for review, 1 an error (bad configuration or rules).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from addons.cli.base import CliError, load_config, with_config


def _load(paths) -> Any:
    from addons.engine.rules import RuleError, RuleSet

    try:
        return RuleSet.load(paths)
    except RuleError as e:
        raise CliError(str(e)) from None


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args)
    except CliError:
        if not args.paths:
            raise
        cfg = None  # candidate files can be checked without a configuration (connection names are not)
    rules = _load(args.paths or cfg.rules)
    if cfg is not None:
        known = {c.name for c in cfg.connections}
        for rule in rules.rules:
            for name in rule.connections:
                if name not in known:
                    print(f"warning: {rule.file}: rule {rule.id!r}: match.connection: no connection named {name!r}")
    print(f"ok: {len(rules.rules)} rules in {len(rules.files)} files"
          + ("" if args.paths else " (the live rules)"))
    return 0


def _explain(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio
    from urllib.parse import urlsplit

    from addons import classifiers
    from addons.engine.connections import Registry
    from addons.engine.errors import Error
    from addons.engine.model import Request
    from addons.engine.tokens import TokenError, Verifier

    cfg = load_config(args)
    rules = _load(cfg.rules)
    try:
        principal = asyncio.run(Verifier(cfg.identity).verify(args.token))
    except TokenError as e:
        return {"decision": {"effect": "deny", "reason": str(e), "error": Error.UNAUTHENTICATED, "rules": []}}
    target = urlsplit(args.url)
    if target.scheme not in ("http", "https") or not target.hostname:
        raise CliError(f"not an http(s) URL: {args.url}")
    port = target.port or (443 if target.scheme == "https" else 80)
    conn = Registry(cfg.connections).find(target.hostname, port)
    if conn is None:
        reason = f"{target.hostname}:{port} is not a registered connection"
        return {"decision": {"effect": "deny", "reason": reason, "error": Error.UNKNOWN_CONNECTION, "rules": []}}
    headers = {}
    for h in args.header:
        name, _, value = h.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = args.body
    if body and body.startswith("@"):
        with open(body[1:], "rb") as fh:
            content = fh.read()
    else:
        content = body.encode() if body else None
    if content and "content-type" not in headers:
        headers["content-type"] = "application/json"
    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
    op = classifiers.classify(conn.kind, conn.name, Request(args.method, path, tuple(headers.items()), content))
    if conn.kind == "mcp":
        from addons.engine import mcpstate

        op = mcpstate.configured(conn, op)  # tool actions as the configuration gives them
    matched, missed = [], []
    for rule in rules.rules:
        if rule.connections and conn.name not in rule.connections:
            continue  # a rule of another connection: it cannot apply here
        failed = rule.first_failure(principal, op)
        if failed is None:
            matched.append(rule)
        else:
            missed.append({"id": rule.id, "effect": rule.effect, "file": rule.file, "failed": failed})
    return {
        "principal": principal.as_dict(),
        "operation": op.as_dict(),
        "decision": rules.decide(principal, op).as_dict(),
        "matched": [{"id": r.id, "effect": r.effect, "file": r.file} for r in matched],
        "not_matched": missed,
    }


def cmd_explain(args: argparse.Namespace) -> int:
    result = _explain(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        d = result["decision"]
        print(f"decision:  {d['effect']}  ({d['reason']})")
        if d.get("rules"):
            print(f"by rules:  {', '.join(d['rules'])}")
        if "operation" in result:
            op, p = result["operation"], result["principal"]
            print(f"operation: {op['summary']}  [action {op['action']}, risk {op['risk']}]")
            print(f"principal: {p['subject']}  groups: {', '.join(p['groups']) or '-'}")
            print(f"rules of connection {op['connection']} that matched:")
            for r in result["matched"] or [{"id": "(none)", "effect": "", "file": ""}]:
                print(f"  + {r['id']:32} {r['effect']:7} {r['file']}")
            print("that did not (the first condition that failed):")
            for r in result["not_matched"]:
                print(f"  - {r['id']:32} {r['effect']:7} {r['failed']}")
    return 0 if result["decision"]["effect"] == "allow" else 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("rules", help="check and explain rules").add_subparsers(dest="rules_command", required=True)
    c = with_config(r.add_parser("check", help="validate rule files: the live ones, or candidates given as paths"))
    c.add_argument("paths", nargs="*", help="rule files or directories to check instead of the live ones")
    c.set_defaults(func=cmd_check)
    e = with_config(r.add_parser(
        "explain", help="show the decision for a request and the rules of its connection that made it",
        epilog="exit status: 0 allowed, 2 denied or held for review, 1 error"))
    e.add_argument("--token", required=True)
    e.add_argument("method")
    e.add_argument("url")
    e.add_argument("--body", help="request body, or @FILE")
    e.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_explain)
