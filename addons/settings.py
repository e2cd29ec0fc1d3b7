"""settings: the one option every Custody addon shares, `custody_config`, parsed once.

The other addons are handed this object and read `settings.config` (and the connection
registry built from it, `settings.registry`) in their own `configure()`, which mitmproxy
calls after this one's because the chain lists it first. A configuration that does not
parse raises OptionsError, and mitmproxy refuses to start.
"""

from __future__ import annotations

from mitmproxy import ctx, exceptions

from addons.engine import config
from addons.engine.connections import Registry


class Settings:
    def __init__(self) -> None:
        self.config: config.Config | None = None
        self.registry = Registry(())

    def load(self, loader) -> None:
        loader.add_option(
            "custody_config",
            str,
            "",
            "Custody configuration file (default: $CUSTODY_CONFIG, else ./custody.yaml).",
        )

    def configure(self, updated: set[str]) -> None:
        if "custody_config" not in updated and self.config is not None:
            return
        try:
            loaded = config.load(config.find(ctx.options.custody_config or None))
        except config.ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.config, self.registry = loaded, Registry(loaded.connections)

    def require(self) -> config.Config:
        if self.config is None:
            raise RuntimeError("custody configuration is not loaded")
        return self.config
