"""The `custody` command: run the gateway, mint development tokens, check and explain
rules, act on approvals, and read and verify the audit log.

    custody run [--config custody.yaml] [--listen-port 8080] [--workers N]   (addons/cli/run.py)
    custody token --sub crew-analyst --groups analysts --ttl 1h     (addons/cli/token.py)
    custody rules check [PATH …] | explain --token T METHOD URL     (addons/cli/rules.py)
    custody approvals list | show ID | approve ID | deny ID | watch  (addons/cli/approvals.py)
    custody login                                                   (approvers' IdP, device grant)
    custody audit tail|sessions|show|replay|export|report|verify|prune|key|migrate   (addons/cli/audit.py)
    custody kubeconfig --connection prod-k8s --token-file agent.jwt (addons/cli/kubeconfig.py)
    custody ssh-config | ssh CONNECTION [CMD] | psql CONNECTION [ARGS]   (addons/cli/connect.py)
    custody status [--all] [--json]                                  (addons/cli/status.py)
"""

from __future__ import annotations

import argparse
import sys

from addons.cli import approvals, audit, connect, kubeconfig, rules, status, token
from addons.cli.base import CliError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="custody", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the gateway (lean runner; see `custody run --help`)", add_help=False)
    token.add_parser(sub)
    rules.add_parser(sub)
    audit.add_parsers(sub)
    approvals.add_parser(sub)
    kubeconfig.add_parser(sub)
    connect.add_parser(sub)
    status.add_parser(sub)
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


if __name__ == "__main__":
    sys.exit(main())
