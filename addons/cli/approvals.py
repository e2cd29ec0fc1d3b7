"""`custody approvals list | show ID | approve ID | deny ID`: the approvers' API from a terminal.

The approver's token comes from --token or $CUSTODY_APPROVER_TOKEN — never from the
agent's $CUSTODY_TOKEN, so a bare command in an agent's shell cannot act as the agent.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from addons.cli.audit import local_time
from addons.cli.base import CliError, load_config, with_config

TOKEN_VARIABLE = "CUSTODY_APPROVER_TOKEN"


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    import urllib.error
    import urllib.request

    base = args.url or os.environ.get("CUSTODY_APPROVALS_URL") or load_config(args).approvals.public_url
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise CliError(f"an approver's token is needed: pass --token or set {TOKEN_VARIABLE}")
    request = urllib.request.Request(
        base.rstrip("/") + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            reason = json.loads(e.read()).get("reason", e.reason)
        except ValueError:
            reason = e.reason
        raise CliError(f"{e.code}: {reason}") from None
    except urllib.error.URLError as e:
        raise CliError(f"cannot reach the approvals API at {base}: {e.reason}") from None


def age(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cmd_list(args: argparse.Namespace) -> int:
    import urllib.parse

    query = urllib.parse.urlencode({k: v for k, v in (("state", args.state), ("connection", args.connection),
                                                       ("requester", args.requester)) if v})
    approvals = call(args, "GET", "/approvals" + (f"?{query}" if query else ""))["approvals"]
    if args.json:
        print(json.dumps(approvals, indent=2))
        return 0
    for a in approvals:
        print(f"{a['id']}  {a['state']:<9} {age(a['created']):>7}  {a['requester']['subject']:<16} "
              f"risk {a['operation']['risk']:>3}  {a['operation']['summary']}  [{', '.join(a['rules'])}]")
    if not approvals:
        print("no approvals" + (f" in state {args.state}" if args.state else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    a = call(args, "GET", f"/approvals/{args.id}")
    if args.json:
        print(json.dumps(a, indent=2))
        return 0
    who = a["requester"]
    print(f"approval   {a['id']}  ({a['state']}{': ' + a['outcome'] if a['outcome'] else ''})")
    print(f"requester  {who['subject']}  groups: {', '.join(who['groups']) or '-'}  "
          + "  ".join(f"{k}: {v}" for k, v in who.get("agent", {}).items())
          + "".join(f"  {k}: {v} (unverified)" for k, v in who.get("asserted", {}).items()
                    if k not in who.get("agent", {})))
    print(f"operation  {a['operation']['summary']}  [action {a['operation']['action']}, risk {a['operation']['risk']}]")
    print(f"why        {', '.join(a['rules'])}: {a['reason']}")
    if p := a.get("provenance"):
        print(f"asked by   no model output: {p['reason']}" if p["match"] == "none" else
              f"asked by   {p['model']} ({p['match']} match of tool call {p['tool_call']}): {p['completion']}")
    print(f"approvers  {', '.join(a['approvers'])}")
    for v in a["votes"]:
        print(f"vote       {v['approver']} {v['vote']}d via {v['via']}" + (f": {v['reason']}" if v["reason"] else ""))
    print(f"request    {a['request']['method']} {a['request']['url']}")
    if a["request"]["body"]:
        print(a["request"]["body"])
    print("timeline:")
    for e in sorted(a["timeline"], key=lambda e: (e["ts"], e["seq"])):
        step = e["detail"].get("step", "")
        print(f"  {local_time(e['ts'])}  {e['kind']:<9} {step:<13} {e['subject'] or '-':<16} "
              f"{e['effect'] or ''} {e['reason'] or ''}".rstrip())
    return 0


def cmd_vote(args: argparse.Namespace) -> int:
    if args.action == "deny" and not args.reason:
        raise CliError("a denial needs a reason: --reason '...'")
    a = call(args, "POST", f"/approvals/{args.id}/{args.action}", {"reason": args.reason or ""})
    print(f"{a['id']}: {a['state']}" + (f" ({a['outcome']})" if a["outcome"] else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser("approvals", help="list, show, approve and deny held requests")
    aps = ap.add_subparsers(dest="approvals_command", required=True)

    def approvals(name: str, help: str) -> argparse.ArgumentParser:
        sp = with_config(aps.add_parser(name, help=help))
        sp.add_argument("--url", help="approvals API (default: $CUSTODY_APPROVALS_URL, else approvals.public_url)")
        sp.add_argument("--token", help=f"your (the approver's) token (default: ${TOKEN_VARIABLE})")
        return sp

    al = approvals("list", "approvals, newest first")
    al.add_argument("--state", default="pending",
                    help="pending (default), approved, executed, denied, expired, abandoned, or ''")
    al.add_argument("--connection")
    al.add_argument("--requester")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=cmd_list)
    ash = approvals("show", "one approval with its request and timeline")
    ash.add_argument("id")
    ash.add_argument("--json", action="store_true")
    ash.set_defaults(func=cmd_show)
    for action in ("approve", "deny"):
        av = approvals(action, f"{action} a pending approval")
        av.add_argument("id")
        av.add_argument("--reason", help="why (required to deny)")
        av.set_defaults(func=cmd_vote, action=action)
