"""settings: the one option every Custody addon shares, `custody_config`, parsed once.

The other addons are handed this object and read `settings.config` (and the connection
registry built from it, `settings.registry`) in their own `configure()`, which mitmproxy
calls after this one's because the chain lists it first; each asks `changed(updated)`.

A configuration that cannot be used (it does not parse, or names rules or a store that
cannot be loaded) is reported through `invalid()`: at start, as one error line per problem
and nothing else, after which mitmproxy's errorcheck ends the process with status 1 (no
traceback, no addon left half-configured); once running, the change is refused with
OptionsError and the last good configuration stays in force.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, exceptions

from addons.engine import config
from addons.engine.connections import Registry
from addons.hardening import STARTUP

logger = logging.getLogger(__name__)


class Settings:
    def __init__(self) -> None:
        self.config: config.Config | None = None
        self.registry = Registry(())
        self.started = False
        self.failed = False

    def load(self, loader) -> None:
        loader.add_option(
            "custody_config",
            str,
            "",
            "Custody configuration file (default: $CUSTODY_CONFIG, else ./custody.yaml).",
        )

    def configure(self, updated: set[str]) -> None:
        if "custody_config" not in updated:
            return
        try:
            loaded = config.load(config.find(ctx.options.custody_config or None))
        except config.ConfigError as e:
            self.invalid(str(e))
            return
        self.config, self.registry = loaded, Registry(loaded.connections)

    def running(self) -> None:
        self.started = True

    def changed(self, updated: set[str]) -> bool:
        """Did this configure bring a configuration the addons should (re)build from?"""
        return "custody_config" in updated and self.config is not None and not self.failed

    def invalid(self, message: str) -> None:
        """The configuration cannot be used: see the module docstring."""
        if self.started:
            raise exceptions.OptionsError(message)
        if not self.failed:
            self.failed = True
            for line in message.splitlines():
                logger.error("custody: %s", line, extra={STARTUP: True})

    def require(self) -> config.Config:
        if self.config is None:
            raise RuntimeError("custody configuration is not loaded")
        return self.config
