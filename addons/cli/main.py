"""The `custody` command: run the gateway, mint development tokens, check and explain
rules, and read and verify the audit log.

    custody run [--config custody.yaml] [--listen-port 8080]
    custody token --sub crew-analyst --groups analysts --ttl 15m
    custody rules check
    custody rules explain --token "$TOKEN" POST https://sample-api.internal/orders --body '{"quantity": 500}'
    custody audit tail|show|replay|export|report|verify|prune|key   (see addons/cli/audit.py)
    custody approvals list | show ID | approve ID [--reason …] | deny ID --reason …
    custody kubeconfig --connection prod-k8s --token-file agent.jwt [--direct] [-o FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from addons import classifiers
from addons.cli import audit, kubeconfig
from addons.engine import config, devissuer, mcpstate
from addons.engine.connections import Registry
from addons.engine.errors import Error
from addons.engine.model import AGENT_ATTRIBUTES, Request
from addons.engine.rules import RuleError, RuleSet, decide
from addons.engine.tokens import TokenError, Verifier


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1 (or .status)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _config(args: argparse.Namespace) -> config.Config:
    try:
        return config.load(config.find(args.config))
    except config.ConfigError as e:
        raise CliError(str(e)) from None


# token


def cmd_token(args: argparse.Namespace) -> int:
    cfg = _config(args)
    dev = cfg.identity.dev_issuer
    if dev is None:
        raise CliError(f"{cfg.path}: the development issuer is not enabled (identity.dev_issuer.enabled)")
    groups = [g for value in args.groups for g in value.split(",") if g]
    agent = {k: getattr(args, k) for k in AGENT_ATTRIBUTES if getattr(args, k)}
    try:
        ttl = config.parse_duration(args.ttl)
        token = devissuer.mint(dev, args.sub, groups=groups, ttl=ttl, agent=agent, audience=args.audience)
    except ValueError as e:
        raise CliError(f"custody token: {e}") from None
    print(token)
    return 0


# rules


def cmd_rules_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    try:
        rules = RuleSet.load(cfg.rules)
    except RuleError as e:
        raise CliError(str(e)) from None
    known = {c.name for c in cfg.connections}
    for rule in rules.rules:
        for name in rule.connections:
            if name not in known:
                print(f"warning: {rule.file}: rule {rule.id!r}: match.connection: no connection named {name!r}")
    print(f"ok: {len(rules.rules)} rules in {len(rules.files)} files")
    return 0


def _explain(cfg: config.Config, args: argparse.Namespace) -> dict[str, Any]:
    try:
        rules = RuleSet.load(cfg.rules)
    except RuleError as e:
        raise CliError(str(e)) from None
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
    path = target.path or "/"
    request = Request(args.method, path + (f"?{target.query}" if target.query else ""), tuple(headers.items()), content)
    op = classifiers.classify(conn.kind, conn.name, request)
    if conn.kind == "mcp":
        op = mcpstate.configured(conn, op)  # tool actions as the configuration gives them
    matched, missed = [], []
    for rule in rules.rules:
        failed = rule.first_failure(principal, op)
        entry = {"id": rule.id, "effect": rule.effect, "file": rule.file}
        if failed is None:
            matched.append(rule)
        else:
            missed.append({**entry, "failed": failed})
    return {
        "principal": principal.as_dict(),
        "operation": op.as_dict(),
        "decision": decide(matched).as_dict(),
        "matched": [{"id": r.id, "effect": r.effect, "file": r.file} for r in matched],
        "not_matched": missed,
    }


def cmd_rules_explain(args: argparse.Namespace) -> int:
    result = _explain(_config(args), args)
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
            print("matching rules:")
            for r in result["matched"] or [{"id": "(none)", "effect": "", "file": ""}]:
                print(f"  + {r['id']:32} {r['effect']:7} {r['file']}")
            print("not matching (first condition that failed):")
            for r in result["not_matched"]:
                print(f"  - {r['id']:32} {r['effect']:7} {r['failed']}")
    return 0 if result["decision"]["effect"] == "allow" else 2


# approvals


def _approvals_api(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    base = args.url or os.environ.get("CUSTODY_APPROVALS_URL") or _config(args).approvals.public_url
    token = args.token or os.environ.get("CUSTODY_TOKEN")
    if not token:
        raise CliError("an approver's token is needed: pass --token or set CUSTODY_TOKEN")
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


def _age(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cmd_approvals_list(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("state", args.state), ("connection", args.connection),
                                                       ("requester", args.requester)) if v})
    approvals = _approvals_api(args, "GET", "/approvals" + (f"?{query}" if query else ""))["approvals"]
    if args.json:
        print(json.dumps(approvals, indent=2))
        return 0
    for a in approvals:
        print(f"{a['id']}  {a['state']:<9} {_age(a['created']):>7}  {a['requester']['subject']:<16} "
              f"risk {a['operation']['risk']:>3}  {a['operation']['summary']}  [{', '.join(a['rules'])}]")
    if not approvals:
        print("no approvals" + (f" in state {args.state}" if args.state else ""))
    return 0


def cmd_approvals_show(args: argparse.Namespace) -> int:
    a = _approvals_api(args, "GET", f"/approvals/{args.id}")
    if args.json:
        print(json.dumps(a, indent=2))
        return 0
    who = a["requester"]
    agent = {**who.get("asserted", {}), **who.get("agent", {})}
    print(f"approval   {a['id']}  ({a['state']}{': ' + a['outcome'] if a['outcome'] else ''})")
    print(f"requester  {who['subject']}  groups: {', '.join(who['groups']) or '-'}  "
          + "  ".join(f"{k}: {v}" for k, v in agent.items()))
    print(f"operation  {a['operation']['summary']}  [action {a['operation']['action']}, risk {a['operation']['risk']}]")
    print(f"why        {', '.join(a['rules'])}: {a['reason']}")
    print(f"approvers  {', '.join(a['approvers'])}")
    for v in a["votes"]:
        print(f"vote       {v['approver']} {v['vote']}d via {v['via']}" + (f": {v['reason']}" if v["reason"] else ""))
    print(f"request    {a['request']['method']} {a['request']['url']}")
    if a["request"]["body"]:
        print(a["request"]["body"])
    print("timeline:")
    for e in a["timeline"]:
        step = e["detail"].get("step", "")
        print(f"  {audit.local_time(e['ts'])}  {e['kind']:<9} {step:<13} {e['subject'] or '-':<16} {e['effect'] or ''} {e['reason'] or ''}".rstrip())
    return 0


def cmd_approvals_vote(args: argparse.Namespace) -> int:
    if args.action == "deny" and not args.reason:
        raise CliError("a denial needs a reason: --reason '...'")
    a = _approvals_api(args, "POST", f"/approvals/{args.id}/{args.action}", {"reason": args.reason or ""})
    print(f"{a['id']}: {a['state']}" + (f" ({a['outcome']})" if a["outcome"] else ""))
    return 0


# kubeconfig


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    cfg = _config(args)
    conn = next((c for c in cfg.connections if c.name == args.connection), None)
    if conn is None:
        names = ", ".join(c.name for c in cfg.connections if c.kind == "kubernetes") or "none"
        raise CliError(f"no connection {args.connection!r} in {cfg.path} (kubernetes connections: {names})")
    ca = Path(args.ca or Path(args.confdir).expanduser() / "mitmproxy-ca-cert.pem")
    agent = kubeconfig.Agent(token=args.token, token_file=args.token_file, namespace=args.namespace)
    try:
        document = kubeconfig.build(conn, agent, ca_file=ca, proxy_url=args.proxy_url, direct=args.direct,
                                    embed_ca=args.embed_ca)
    except kubeconfig.KubeconfigError as e:
        raise CliError(f"custody kubeconfig: {e}") from None
    text = yaml.safe_dump(document, sort_keys=False)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold a token
        with os.fdopen(fd, "w") as out:
            out.write(text)
        print(f"wrote {args.output}: KUBECONFIG={args.output} kubectl get pods", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="custody", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="configuration file (default: $CUSTODY_CONFIG, ./custody.yaml)")
        return sp

    sub.add_parser("run", help="run the gateway (lean runner; see `custody run --help`)", add_help=False)

    t = with_config(sub.add_parser("token", help="mint a token from the development issuer"))
    t.add_argument("--sub", required=True, help="subject (who the agent is)")
    t.add_argument("--groups", action="append", default=[], help="group, or comma-separated groups; repeatable")
    t.add_argument("--ttl", default="15m", help="lifetime, e.g. 15m (default 15m)")
    t.add_argument("--audience", help="audience (default: the issuer's)")
    for name in AGENT_ATTRIBUTES:
        t.add_argument(f"--{name}", help=f"verified agent attribute: {name}")
    t.set_defaults(func=cmd_token)

    r = sub.add_parser("rules", help="check and explain rules").add_subparsers(dest="rules_command", required=True)
    with_config(r.add_parser("check", help="validate every rule file")).set_defaults(func=cmd_rules_check)
    e = with_config(r.add_parser("explain", help="show the decision for a request and the rules that made it"))
    e.add_argument("--token", required=True)
    e.add_argument("method")
    e.add_argument("url")
    e.add_argument("--body", help="request body, or @FILE")
    e.add_argument("-H", "--header", action="append", default=[], help="'Name: value', repeatable")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_rules_explain)

    audit.add_parsers(sub, with_config)

    ap = sub.add_parser("approvals", help="list, show, approve and deny held requests")
    aps = ap.add_subparsers(dest="approvals_command", required=True)

    def approvals(name: str, help: str) -> argparse.ArgumentParser:
        sp = with_config(aps.add_parser(name, help=help))
        sp.add_argument("--url", help="approvals API (default: $CUSTODY_APPROVALS_URL, else approvals.public_url)")
        sp.add_argument("--token", help="your token (default: $CUSTODY_TOKEN)")
        return sp

    al = approvals("list", "approvals, newest first")
    al.add_argument("--state", default="pending", help="pending (default), approved, executed, denied, expired, abandoned, or ''")
    al.add_argument("--connection")
    al.add_argument("--requester")
    al.add_argument("--json", action="store_true")
    al.set_defaults(func=cmd_approvals_list)
    ash2 = approvals("show", "one approval with its request and timeline")
    ash2.add_argument("id")
    ash2.add_argument("--json", action="store_true")
    ash2.set_defaults(func=cmd_approvals_show)
    for action in ("approve", "deny"):
        av = approvals(action, f"{action} a pending approval")
        av.add_argument("id")
        av.add_argument("--reason", help="why (required to deny)")
        av.set_defaults(func=cmd_approvals_vote, action=action)

    k = with_config(sub.add_parser("kubeconfig", help="write a kubeconfig that reaches a kubernetes connection "
                                                       "through the gateway"))
    k.add_argument("--connection", required=True, help="the kubernetes connection's name")
    k.add_argument("--token", help="the agent's token, written into the kubeconfig")
    k.add_argument("--token-file", help="a file holding the agent's token (kubectl re-reads it: rotation)")
    k.add_argument("--namespace", default="default")
    k.add_argument("--proxy-url", default=os.environ.get("CUSTODY_PROXY_URL", "http://127.0.0.1:8080"),
                   help="the gateway as agents reach it (default: $CUSTODY_PROXY_URL, else http://127.0.0.1:8080)")
    k.add_argument("--direct", action="store_true", help="no proxy: the connection's own listener (its `listen`)")
    k.add_argument("--confdir", default=os.environ.get("CUSTODY_CONFDIR", "~/.mitmproxy"),
                   help="the gateway's mitmproxy confdir, where its CA is (default: $CUSTODY_CONFDIR, ~/.mitmproxy)")
    k.add_argument("--ca", help="the gateway CA certificate (default: CONFDIR/mitmproxy-ca-cert.pem)")
    k.add_argument("--embed-ca", action="store_true", help="embed the CA (certificate-authority-data)")
    k.add_argument("-o", "--output", help="write here (mode 0600) instead of stdout")
    k.set_defaults(func=cmd_kubeconfig)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from addons.cli import run  # only `run` needs mitmproxy's master and its addons

        return run.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(e, file=sys.stderr)
        return e.status
    except audit.AuditError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
