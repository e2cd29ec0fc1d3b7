"""`custody token`: mint a token from the development issuer (embedded defaults only)."""

from __future__ import annotations

import argparse

from addons.cli.base import CliError, load_config, with_config
from addons.engine.model import AGENT_ATTRIBUTES


def cmd_token(args: argparse.Namespace) -> int:
    from addons.engine import devissuer
    from addons.engine.config import parse_duration

    cfg = load_config(args)
    dev = cfg.identity.dev_issuer
    if dev is None:
        raise CliError(f"{cfg.path}: the development issuer is not enabled (identity.dev_issuer.enabled)")
    groups = [g for value in args.groups for g in value.split(",") if g]
    agent = {k: getattr(args, k) for k in AGENT_ATTRIBUTES if getattr(args, k)}
    try:
        ttl = parse_duration(args.ttl)
        token = devissuer.mint(dev, args.sub, groups=groups, ttl=ttl, agent=agent, audience=args.audience)
    except ValueError as e:
        raise CliError(f"custody token: {e}") from None
    print(token)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = with_config(sub.add_parser("token", help="mint a token from the development issuer"))
    t.add_argument("--sub", required=True, help="subject (who the agent is)")
    t.add_argument("--groups", action="append", default=[], help="group, or comma-separated groups; repeatable")
    t.add_argument("--ttl", default="15m", help="lifetime, e.g. 15m or 8h (default 15m; at most dev_issuer.max_ttl)")
    t.add_argument("--audience", help="audience (default: the issuer's)")
    for name in AGENT_ATTRIBUTES:
        t.add_argument(f"--{name}", help=f"verified agent attribute: {name}")
    t.set_defaults(func=cmd_token)
