"""Custody's addon chain: `mitmdump -s addons/chain.py` (or mitmweb, or `custody run`).

mitmproxy runs every hook in list order, response hooks included, so `build()` is the
order of a request's story (docs/design.md):

    hardening, settings                  options the chain needs; the configuration, once
    replica                              this process among the gateway's replicas: lease,
                                         readiness, stopping (before the store: its done)
    sinks, retention                     the audit log shipped to SIEMs as it is written, and
                                         pruned to store.retention once they have it
    auditlog, approvalbook, maskpool,    shared services, no flow hooks: the audit store,
    sessions                             the approvals, the masking workers, pg sessions
    limits                               what one client may cost: connections, time, headers
    wellknown                            the gateway's public endpoints (no token needed)
    signin, slackapp                     approvers' SSO sign-in (OIDC, SAML) and Slack's button clicks
    identity → classify                  who is asking; which connection, what it does
    pgplanner, sshplanner                what a statement or command line does in its session
    mcpguard                             MCP: session owners, tool actions and pins; on the way
                                         back the tools offered, the server's requests, masking
    modelguard                           model calls: the connection's API; on the way back the
                                         completion read, masked, recorded, its tool calls kept
    provenance                           which model output (if any) asked for this request
    policy → hold                        the decision; a review holds the flow for approvers
    promptmask                           a model call's prompt masked before it leaves
    masking → recorder                   responses masked, then everything put on record
    approverapi                          approvers' calls, answered once they are on record
    credentials                          the gateway's credential on the way upstream
    pgexecutor, sshexecutor, mcpstdio    terminals: Postgres, SSH and stdio MCP flows answered locally
    metrics, logs                        every finished request counted (the Prometheus endpoint),
                                         and logged (JSON lines that name its audit events)

Masking acts on responses (on requests it only asks for a maskable format), and on
responses it runs before the recorder, which therefore only ever sees masked bodies; MCP
responses are masked message by message by mcpguard, and completions by modelguard, whose response
hooks run first. The gate goes after everything, mitmproxy's own addons included (addons/gate.py).
"""

from __future__ import annotations

import inspect

from mitmproxy import addonmanager, ctx, exceptions, hooks

from addons.approvalbook import ApprovalBook
from addons.approverapi import ApproverAPI
from addons.auditlog import AuditLog
from addons.classify import Classify
from addons.credentials import Credentials
from addons.engine.provenance import Ledger
from addons.gate import Gate
from addons.hardening import Hardening
from addons.hold import Hold
from addons.identity import Identity
from addons.limits import Limits
from addons.logs import Logs
from addons.masking import Masking
from addons.maskpool import MaskPool
from addons.mcpguard import McpGuard
from addons.mcpstdio import McpStdio
from addons.metrics import Metrics
from addons.modelguard import ModelGuard
from addons.policy import Policy
from addons.promptmask import PromptMask
from addons.provenance import Provenance
from addons.recorder import Recorder
from addons.replica import Replica
from addons.retention import Retention
from addons.settings import Settings
from addons.signin import Signin
from addons.sinks import Sinks
from addons.slackapp import SlackApp
from addons.wellknown import WellKnown
from pg_bridge.terminal.executor import PgExecutor
from pg_bridge.terminal.planner import PgPlanner
from pg_bridge.terminal.sessions import Sessions
from ssh_bridge.terminal.executor import SshExecutor
from ssh_bridge.terminal.planner import SshPlanner


def build() -> list:
    """A fresh chain of Custody addons, in hook order."""
    settings = Settings()
    log = AuditLog(settings)
    book = ApprovalBook(settings, log)
    pool = MaskPool(settings)
    sessions = Sessions()
    ssh = SshExecutor(settings)
    policy = Policy(settings)
    credentials = Credentials(settings)
    replica = Replica(settings, log, book, policy, pool)
    ledger = Ledger()
    signin = Signin(settings, log)
    return [
        Hardening(),
        settings,
        replica,
        Sinks(settings, log),
        Retention(settings, log),
        log,
        book,
        pool,
        sessions,
        Limits(settings),
        WellKnown(settings, replica),
        signin,
        SlackApp(settings, book, log),
        Identity(settings, signin),
        Classify(settings),
        PgPlanner(sessions, policy),
        SshPlanner(ssh),
        McpGuard(settings, log, pool, policy, credentials),
        ModelGuard(settings, log, pool, ledger),
        Provenance(ledger, log, policy),
        policy,
        Hold(settings, book, pool),
        PromptMask(pool),
        Masking(settings, pool),
        Recorder(settings, log, pool),
        ApproverAPI(settings, book),
        credentials,
        PgExecutor(settings, sessions),
        ssh,
        McpStdio(settings),
        Metrics(settings),
        Logs(settings),
    ]


class Chain:
    """The chain as one addon with children, the way mitmdump holds a script's addons.

    mitmproxy wraps each top-level addon's hook in its own error handler for every event;
    one parent instead of eight saves that per event, and changes nothing else: every
    Custody hook guards itself (addons/failclosed.py).
    """

    def __init__(self) -> None:
        self.addons = build()

    @property
    def settings(self) -> Settings:
        return next(a for a in self.addons if isinstance(a, Settings))

    @property
    def replica(self) -> Replica:
        return next(a for a in self.addons if isinstance(a, Replica))


class Hooks(addonmanager.AddonManager):
    """mitmproxy's addon manager, resolving each event's hooks once.

    mitmproxy walks the whole addon tree and looks each hook up by name for every event of
    every flow, entering an error handler per top-level addon: some 40 addons under
    `custody run`, 68 top-level ones under mitmdump with the chain (most with no hook for
    the event), a dozen events a flow, and under mitmdump an `update` after each. What it
    finds changes only when the tree does, and every change of the tree goes through the
    manager: an addon registered or removed (a script loaded, reloaded or unloaded), all
    cleared, or options changed (the `scripts` option reorders the scripts' addons in its
    own `configure`, dispatched by `trigger`); each forgets what was resolved. Events are
    dispatched as mitmproxy does (each top-level addon's hooks under its own error
    handler, an AddonHalt ending the event), only to the top-level addons with a hook; an
    addon added while an event is being dispatched sees the next one."""

    _resolved: dict[str, list[list]]

    def __init__(self, master) -> None:
        super().__init__(master)
        self._resolved = {}

    @classmethod
    def adopt(cls, manager: addonmanager.AddonManager) -> None:
        """Make a running master's manager this one, keeping its addons (mitmdump's and
        mitmweb's, which the chain's script cannot construct)."""
        if not isinstance(manager, cls):
            manager.__class__ = cls
            manager._resolved = {}

    async def trigger_event(self, event: hooks.Hook) -> None:
        tops = self._tops(event)
        if tops is None:  # an addon's hook could not be resolved: mitmproxy logs it and goes on
            await super().trigger_event(event)
            return
        for funcs in tops:
            try:
                with addonmanager.safecall():
                    for _, func in funcs:
                        res = func(*event.args())
                        if res is not None and inspect.isawaitable(res):
                            await res
            except exceptions.AddonHalt:
                return

    def _tops(self, event: hooks.Hook) -> list[list] | None:
        """The hooks of each top-level addon that has any for `event`, in chain order;
        None (not kept) when one of them cannot be resolved (a hook name that is not
        callable). Only events dispatched here are kept: loading, `trigger` and mitmproxy's
        own direct calls (`script.run`) resolve as mitmproxy does, every time."""
        found = self._resolved.get(event.name)
        if found is None:
            found = []
            try:
                for addon in self.chain:
                    if funcs := list(super()._iter_hooks(addon, event)):
                        found.append(funcs)
            except exceptions.AddonManagerError:
                return None
            self._resolved[event.name] = found
        return found

    def register(self, addon):
        try:
            return super().register(addon)
        finally:
            self._resolved.clear()

    def remove(self, addon) -> None:
        try:
            super().remove(addon)
        finally:
            self._resolved.clear()

    def clear(self) -> None:
        try:
            super().clear()
        finally:
            self._resolved.clear()

    def trigger(self, event: hooks.Hook) -> None:
        self._resolved.clear()
        try:
            super().trigger(event)
        finally:
            self._resolved.clear()


def _install_gate() -> None:
    """Put the gate at the very end of the running master's addons, once; and let its
    manager resolve each event's hooks once (`Hooks`)."""
    master = getattr(ctx, "master", None)
    if master is not None:
        Hooks.adopt(master.addons)
        if master.addons.get("gate") is None:
            master.addons.add(Gate())


if __name__.startswith("__mitmproxy_script__"):
    _install_gate()
    addons = build()
