"""Custody's addon chain: `mitmdump -s addons/chain.py` (or mitmweb, or `custody run`).

mitmproxy runs every hook in list order, response hooks included, so the order below is
the order of DESIGN.md: identity, classify, policy, approval, masking, recorder, credentials,
terminals. The bridges' planners sit between classify and policy (a statement's row
estimate and what `EXECUTE name` runs, a command line's working directory, are part of
what it does), and their executors are the terminals that answer Postgres and SSH flows
on the real server or host; each planner reads its executor's open sessions.
Before them: settings (the others read it while configuring), the audit log, the approvals
book and the masking workers (shared services with no flow hooks), and the gateway's
public endpoints (they need no token). Masking has only response hooks, so on responses it
runs before the recorder, which therefore only ever sees masked bodies. The approvals API answers the gateway's own host after the recorder has put the
call on record, and before anything could send it upstream. The gate goes after everything,
mitmproxy's own addons included (see addons/gate.py).
"""

from __future__ import annotations

import logging

from mitmproxy import ctx

from addons.approval import Approval
from addons.approvalapi import ApprovalAPI
from addons.approvals import ApprovalBook
from addons.auditlog import AuditLog
from addons.classify import Classify
from addons.credentials import Credentials
from addons.gate import Gate
from addons.identity import Identity
from addons.maskpool import MaskPool
from addons.masking import Masking
from addons.policy import Policy
from addons.recorder import Recorder
from addons.settings import Settings
from addons.wellknown import WellKnown
from pg_bridge.executor import PgExecutor
from pg_bridge.planner import Planner
from pg_bridge.sessions import Sessions
from ssh_bridge.executor import SshExecutor
from ssh_bridge.planner import SshPlanner


logger = logging.getLogger(__name__)


def build() -> list:
    """A fresh chain of Custody addons, in hook order."""
    settings = Settings()
    log = AuditLog(settings)
    book = ApprovalBook(settings, log)
    pool = MaskPool(settings)
    sessions = Sessions()
    ssh = SshExecutor(settings)
    return [
        Hardening(),
        settings,
        log,
        book,
        pool,
        sessions,
        WellKnown(settings),
        Identity(settings),
        Classify(settings),
        Planner(sessions),
        SshPlanner(ssh),
        Policy(settings),
        Approval(settings, book, pool),
        Masking(settings, pool),
        Recorder(settings, log, pool),
        ApprovalAPI(settings, book),
        Credentials(settings),
        PgExecutor(settings, sessions),
        ssh,
    ]


class Chain:
    """The chain as one addon with children, the way mitmdump holds a script's addons.

    mitmproxy wraps each top-level addon's hook in its own error handler for every event;
    one parent instead of eight saves that per event, and changes nothing else: every
    Custody hook guards itself (addons/failclosed.py).
    """

    def __init__(self) -> None:
        self.addons = build()


# mitmproxy options that would let bytes past the chain, and the values the chain needs:
# no upstream connection before a decision; no request or response streamed before the
# chain has seen it; nothing relayed as raw TCP/UDP or passed through uninspected.
REQUIRED = {
    "connection_strategy": "lazy",
    "stream_large_bodies": None,
    "rawtcp": False,
    "tcp_hosts": [],
    "udp_hosts": [],
    "ignore_hosts": [],
    "allow_hosts": [],
}


class Hardening:
    """Keeps the options in REQUIRED at the values the chain depends on, whatever is set."""

    def configure(self, updated: set[str]) -> None:
        wrong = {k: v for k, v in REQUIRED.items() if k in ctx.options and getattr(ctx.options, k) != v}
        if wrong:
            logger.warning("custody: overriding mitmproxy options the gateway cannot allow: %s", ", ".join(wrong))
            ctx.options.update(**wrong)


def _install_gate() -> None:
    """Put the gate at the very end of the running master's addons, once."""
    master = getattr(ctx, "master", None)
    if master is not None and master.addons.get("gate") is None:
        master.addons.add(Gate())


if __name__.startswith("__mitmproxy_script__"):
    _install_gate()
    addons = build()
