"""planner: a command line as it will run in its session, before policy decides on it.

Runs after classify and before policy. A relative path means nothing without the
directory it is resolved from, and a shell session keeps its directory from line to line
(`cd /etc` on one line, `echo x > hosts` on the next): classify cannot know it, the
session can. So ssh lines are classified again here with the session's directory, and a
write the gateway cannot place (no session, or a directory it lost) stays `unknown`.
"""

from __future__ import annotations

import dataclasses

from mitmproxy import http

from addons import context, failclosed
from addons.classifiers import ssh
from addons.failclosed import guarded
from ssh_bridge.terminal.executor import SshExecutor


class SshPlanner:
    def __init__(self, executor: SshExecutor) -> None:
        self.executor = executor

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        op = c.operation
        if op is None or op.protocol != "ssh" or op.details.get("phase") not in ("exec", "shell"):
            return
        cwd = self.executor.directory(op.details.get("session", ""), c.principal, c.connection, op.details["phase"])
        body = op.payload if isinstance(op.payload, dict) else {}
        extra = {k: op.details[k] for k in ("session",) if k in op.details}
        c.operation = dataclasses.replace(
            ssh.classify(op.connection, op.details["phase"], op.details["line"], extra, cwd=cwd,
                              stdin=bool(body.get("stdin"))), payload=op.payload)
