"""What every `custody` command shares: user-facing errors and reading the configuration.

Commands import what they need inside their functions, so `custody token` does not pay for
the audit store and `custody audit tail` does not pay for the SQL parser: a short command
starts in a few hundred milliseconds (bench/cli.py).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from addons.engine.config import Config


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1 (or .status)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--config", help="configuration file (default: $CUSTODY_CONFIG, ./custody.yaml)")
    return sp


def load_config(args: argparse.Namespace) -> Config:
    """The configuration without backend secrets: no command but `run` holds them."""
    from addons.engine import config

    try:
        return config.load(config.find(args.config), secrets=False)
    except config.ConfigError as e:
        raise CliError(str(e)) from None
