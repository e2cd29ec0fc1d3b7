"""`custody status`: the gateway's live replicas, as the audit store knows them.

    custody status [--config custody.yaml] [--all] [--json]

Every gateway process renews a lease in the store (addons/replica.py). This lists the live
ones (with `--all`, the stopped and lapsed too): id, host and pid, state, seconds since its
heartbeat, where it listens, and the hashes of the rule set and the configuration it runs,
and warns when the live ones differ in either. Exit status 1 when no replica is live or
they disagree.
"""

from __future__ import annotations

import argparse
import json
import sys

from addons.cli.base import CliError, load_config, with_config


def cmd_status(args: argparse.Namespace) -> int:
    from addons.engine import store
    from addons.engine.replicas import disagreements, live

    cfg = load_config(args)
    try:
        replicas = store.open_store(cfg.store).replicas()
    except store.StoreError as e:
        raise CliError(str(e)) from None
    alive = live(replicas, cfg.replica.lease)
    warnings = disagreements(alive) if alive else ["no replica of the gateway is live"]
    shown = replicas if args.all else alive
    if args.json:
        print(json.dumps({"replicas": [{**r, "live": r in alive} for r in shown], "warnings": warnings}, indent=2))
    else:
        for r in shown:
            state = r["state"] if r in alive or r["state"] == "stopped" else "lapsed"
            print(f"{r['id']:<40} {state:<9} "
                  f"{r['age']:>6.1f}s ago  listen {r['listen'] or '-':<22} rules {(r['rules'] or '-')[:12]}  "
                  f"config {(r['config'] or '-')[:12]}")
        for warning in warnings:
            print(f"WARNING: {warning}", file=sys.stderr)
    return 1 if warnings else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sp = with_config(sub.add_parser("status", help="the gateway's live replicas, and whether they agree"))
    sp.add_argument("--all", action="store_true", help="stopped and lapsed replicas too")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
