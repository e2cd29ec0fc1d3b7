"""policy: evaluates every rule against the Principal and Operation and writes the Decision.

Rules come from the files and directories the configuration names. An invalid rule set
stops the gateway at start (OptionsError naming file, rule id and field). The files are
polled; a change is loaded and swapped in whole, or, when it is invalid, logged and
ignored so the last good rule set stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os

from mitmproxy import http

from addons import context, failclosed
from addons.engine.config import GATEWAY_CONNECTION
from addons.engine import metrics
from addons.engine.errors import Error
from addons.engine.model import Decision
from addons.engine.rules import RuleError, RuleSet, rule_files
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)


def fingerprint(paths: tuple[str, ...]) -> tuple:
    """What the rule files look like on disk: names, sizes, mtimes and inodes."""
    try:
        files = rule_files(paths)
    except RuleError:
        return ("missing",)
    out = []
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            out.append((name, None))
        else:
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


class Policy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules: RuleSet | None = None
        self._seen: tuple = ()
        self._poller: asyncio.Task | None = None

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        paths = self.settings.require().rules
        seen = fingerprint(paths)
        try:
            self.rules = RuleSet.load(paths)
        except RuleError as e:
            self.settings.invalid(f"invalid rules:\n{e}")
            return
        self._seen = seen
        logger.info("custody: %d rules loaded from %d files", len(self.rules.rules), len(self.rules.files))

    def running(self) -> None:
        self._poller = asyncio.ensure_future(self._poll())

    def done(self) -> None:
        if self._poller:
            self._poller.cancel()

    def reload(self) -> bool:
        """Load the rule files again if they changed; keep the last good set if invalid."""
        paths = self.settings.require().rules
        seen = fingerprint(paths)
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            rules = RuleSet.load(paths)
        except RuleError as e:
            logger.error("custody: rules changed but are invalid; keeping the last good set:\n%s", e)
            return False
        self.rules = rules
        logger.info("custody: rules reloaded: %d rules from %d files", len(rules.rules), len(rules.files))
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.require().rules_poll)
            try:
                self.reload()
            except Exception:
                logger.exception("custody: rule reload failed; keeping the last good set")

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        ctx = context.of(f)
        if ctx.principal is None or ctx.operation is None:
            failclosed.refuse(f, 403, "request was not identified and classified", error=Error.GATEWAY_ERROR)
            return
        if ctx.operation.connection == GATEWAY_CONNECTION:
            # The gateway's own API: who may approve what is decided per approval by the API.
            ctx.decision = Decision(effect="allow", rules=("custody:gateway-api",), reason="the gateway's own API")
            return
        with metrics.DECISION_SECONDS.labels(ctx.protocol or "none").time():
            decision = self.rules.decide(ctx.principal, ctx.operation)
        if decision.effect == "deny":
            failclosed.refuse(f, decision.status, decision.reason, error=decision.error, rules=decision.rules)
        else:
            ctx.decision = decision
