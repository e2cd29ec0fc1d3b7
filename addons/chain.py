"""Custody's addon chain: `mitmdump -s addons/chain.py` (or mitmweb, or `custody run`).

mitmproxy runs every hook in list order, response hooks included, so the order below is
the order of DESIGN.md: identity, classify, policy, approval, recorder, credentials. Before
them: settings (the others read it while configuring), the audit log and the approvals
book (shared services with no flow hooks), and the gateway's public endpoints (they need
no token). The approvals API answers the gateway's own host after the recorder has put the
call on record, and before anything could send it upstream. The gate goes after everything,
mitmproxy's own addons included (see addons/gate.py).
"""

from __future__ import annotations

from mitmproxy import ctx

from addons.approval import Approval
from addons.approvalapi import ApprovalAPI
from addons.approvals import ApprovalBook
from addons.auditlog import AuditLog
from addons.classify import Classify
from addons.credentials import Credentials
from addons.gate import Gate
from addons.identity import Identity
from addons.policy import Policy
from addons.recorder import Recorder
from addons.settings import Settings
from addons.wellknown import WellKnown


def build() -> list:
    """A fresh chain of Custody addons, in hook order."""
    settings = Settings()
    log = AuditLog(settings)
    book = ApprovalBook(settings, log)
    return [
        Hardening(),
        settings,
        log,
        book,
        WellKnown(settings),
        Identity(settings),
        Classify(settings),
        Policy(settings),
        Approval(settings, book),
        Recorder(settings, log),
        ApprovalAPI(settings, book),
        Credentials(settings),
    ]


class Chain:
    """The chain as one addon with children, the way mitmdump holds a script's addons.

    mitmproxy wraps each top-level addon's hook in its own error handler for every event;
    one parent instead of eight saves that per event, and changes nothing else: every
    Custody hook guards itself (addons/failclosed.py).
    """

    def __init__(self) -> None:
        self.addons = build()


class Hardening:
    """Options the chain depends on: no upstream connection before a decision is made."""

    def configure(self, updated: set[str]) -> None:
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")


def _install_gate() -> None:
    """Put the gate at the very end of the running master's addons, once."""
    master = getattr(ctx, "master", None)
    if master is not None and master.addons.get("gate") is None:
        master.addons.add(Gate())


if __name__.startswith("__mitmproxy_script__"):
    _install_gate()
    addons = build()
