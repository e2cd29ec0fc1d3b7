"""The `custody` command line: run, token, approvals, audit, rules, kubeconfig.

`main` (addons/cli/main.py) dispatches; each command family is a module of its own.
"""

from addons.cli.main import main

__all__ = ["main"]
