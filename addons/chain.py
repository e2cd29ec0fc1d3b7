"""Custody's addon chain: `mitmdump -s addons/chain.py` (or mitmweb, or `custody run`).

mitmproxy runs every hook in list order, response hooks included, so the order below is
the order of DESIGN.md: identity, classify, policy, recorder, credentials; the settings
addon first because the others read it while configuring, and the gateway's own
endpoints before identity because they need no token. The gate goes after everything,
mitmproxy's own addons included (see addons/gate.py).
"""

from __future__ import annotations

from mitmproxy import ctx

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
    return [
        Hardening(),
        settings,
        WellKnown(settings),
        Identity(settings),
        Classify(settings),
        Policy(settings),
        Recorder(settings),
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
