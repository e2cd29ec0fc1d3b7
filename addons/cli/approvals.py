"""`custody approvals list | show ID | approve ID | deny ID | watch | grants | revoke ID`,
and `custody login`: the approvers' API from a terminal.

The approver's token comes from --token, $CUSTODY_APPROVER_TOKEN, or the file `custody login`
wrote ($CUSTODY_APPROVER_TOKEN_FILE, else ~/.config/custody/approver-token) — never from the
agent's $CUSTODY_TOKEN, so a bare command in an agent's shell cannot act as the agent.
`custody login` signs in with the IdP of `approvals.oidc` by the device authorization grant
(open the link it prints, anywhere, and sign in) and keeps the ID token in that file (0600).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from addons.cli.audit import local_time
from addons.cli.base import CliError, load_config, with_config

TOKEN_VARIABLE = "CUSTODY_APPROVER_TOKEN"
TOKEN_FILE_VARIABLE = "CUSTODY_APPROVER_TOKEN_FILE"


def token_file() -> Path:
    explicit = os.environ.get(TOKEN_FILE_VARIABLE)
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "custody" / "approver-token"


def approver_token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    if not token and token_file().is_file():
        token = token_file().read_text().strip()
    if not token:
        raise CliError(f"an approver's token is needed: pass --token or set {TOKEN_VARIABLE}")
    return token


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None,
         headers: dict[str, str] | None = None, raw: bool = False, timeout: float = 30) -> Any:
    import urllib.error
    import urllib.request

    base = args.url or os.environ.get("CUSTODY_APPROVALS_URL") or load_config(args).approvals.public_url
    token = approver_token(args)
    request = urllib.request.Request(
        base.rstrip("/") + path, method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content = response.read()
            return content.decode() if raw else json.loads(content)
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
              f"asked by   unknown: {p['reason']}" if p["match"] == "unknown" else
              f"asked by   {p['model']} ({p['match']} match of tool call {p['tool_call']}): {p['completion']}")
    print(f"justified  {a.get('justification') or '(no justification given)'}")
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
    body = {"reason": args.reason or "", **({"grant": args.grant} if getattr(args, "grant", None) else {})}
    a = call(args, "POST", f"/approvals/{args.id}/{args.action}", body)
    print(f"{a['id']}: {a['state']}" + (f" ({a['outcome']})" if a["outcome"] else ""))
    return 0


def cmd_grants(args: argparse.Namespace) -> int:
    for g in call(args, "GET", "/grants")["grants"]:
        shape = g["shape"]
        print(f"{g['id']}  {g['state']:<8} {g['principal']['subject']:<16} {shape['action']} {shape['resource']} "
              f"on {shape['connection']}  until {local_time(g['expires'])}  by {', '.join(g['granted_by'])}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    g = call(args, "POST", f"/grants/{args.id}/revoke", {"reason": args.reason or ""})
    print(f"{g['id']}: {g['state']}")
    return 0


def watch_line(event: dict[str, Any]) -> str:
    mark = "can decide" if event["actionable"] else ""
    return (f"{time.strftime('%H:%M:%S')}  {event['id']}  {event['state']:<9} {event['requester']:<16} "
            f"risk {event['risk']:>3}  {event['summary']}  {mark}".rstrip())


def cmd_watch(args: argparse.Namespace) -> int:
    """Follow the inbox: one line per change, as the page sees them (until interrupted). A
    `reload` (this client fell behind, or the balancer moved it to another replica) lists
    again what is open now."""
    query = "?actionable=1" if args.actionable else ""
    last = ""
    listed = False
    try:
        while True:
            if not listed:
                for a in call(args, "GET", f"/approvals{'?actionable=1' if args.actionable else '?state=pending'}"
                              )["approvals"]:
                    print(watch_line({"id": a["id"], "state": a["state"], "requester": a["requester"]["subject"],
                                      "risk": a["operation"]["risk"], "summary": a["operation"]["summary"],
                                      "actionable": args.actionable}), flush=True)
                listed = True
            text = call(args, "GET", f"/approvals/events{query}", headers={"last-event-id": last} if last else None,
                        raw=True, timeout=60)
            event = ""
            for line in text.splitlines():
                if line.startswith("id: "):
                    last = line[4:]
                elif line.startswith("event: "):
                    event = line[7:]
                    listed = listed and event != "reload"
                elif line.startswith("data: ") and event == "approval":
                    print(watch_line(json.loads(line[6:])), flush=True)
    except KeyboardInterrupt:
        return 0


def cmd_login(args: argparse.Namespace) -> int:
    from addons.engine.oauth import GrantError, device_login, token_expiry

    settings = load_config(args).approvals.oidc
    if settings is None:
        raise CliError("approvals.oidc is not configured: there is no identity provider to sign in with")

    def show(authorization: dict[str, Any]) -> None:
        link = authorization.get("verification_uri_complete") or authorization["verification_uri"]
        print(f"To sign in, open {link}\nand confirm the code {authorization['user_code']}.", flush=True)

    try:
        answer = device_login(settings.issuer.issuer, settings.client_id, " ".join(settings.scopes), show)
    except GrantError as e:
        raise CliError(f"custody login: {e}") from None
    token = answer.get("id_token")
    if not token:
        raise CliError("custody login: the identity provider gave no ID token (is `openid` in approvals.oidc.scopes?)")
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    print(f"signed in; the approver's token is in {path} until {local_time(token_expiry(token))}", file=sys.stderr)
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
        if action == "approve":
            av.add_argument("--grant", help="also allow this principal this operation's shape for this long, e.g. 30m "
                                            "(at most what the rules allow)")
        av.set_defaults(func=cmd_vote, action=action)
    aw = approvals("watch", "follow the inbox live: one line per change")
    aw.add_argument("--actionable", action="store_true", help="only approvals you are an approver of")
    aw.set_defaults(func=cmd_watch)
    ag = approvals("grants", "time-boxed grants you may see")
    ag.set_defaults(func=cmd_grants)
    ar = approvals("revoke", "end a time-boxed grant now")
    ar.add_argument("id")
    ar.add_argument("--reason")
    ar.set_defaults(func=cmd_revoke)
    lg = with_config(sub.add_parser("login", help="sign in with the approvers' IdP (device grant); keeps the token"))
    lg.set_defaults(func=cmd_login)
