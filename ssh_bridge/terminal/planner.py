"""planner: a command line as it will run in its session, before policy decides on it.

Runs after classify and before policy. What a line does depends on where it runs: a
relative path means nothing without the directory (`cd /etc` on one line, `echo x > hosts`
on the next), a program name nothing without the PATH, and a path nothing without the
symlinks on the way (`/tmp/l/passwd` may be /etc/passwd). Classify cannot know them; the
session can. So each ssh line is classified here again in its session (directory, PATH,
home), and then once more with the host's answers about the paths and programs it names
(backend.Host.resolve; a bare program word on a PATH the host said is all system
directories is not asked about, since the answer could not change what it is). A line the gateway cannot place (no session, a directory it lost)
stays `unknown` where that matters.

An interactive program (an editor, a pager, top) cannot be governed line by line; it is
refused here, before any rule could hold it for an approval it could never use.
"""

from __future__ import annotations

import dataclasses

from mitmproxy import http

from addons import context, failclosed
from addons.classifiers import ssh
from addons.engine.errors import Error
from addons.failclosed import guarded
from ssh_bridge.terminal.backend import HostError
from ssh_bridge.terminal.executor import SshExecutor


class SshPlanner:
    def __init__(self, executor: SshExecutor) -> None:
        self.executor = executor

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        op = c.operation
        if op is None or op.protocol != "ssh" or op.details.get("phase") not in ("exec", "shell"):
            return
        phase = op.details["phase"]
        session = self.executor.session(op.details.get("session", ""), c.principal, c.connection)
        extra = {k: op.details[k] for k in ("session",) if k in op.details}
        where = ssh.Session(cwd=None, path=None, stdin=phase == "exec")
        if session is not None:
            host = session.host
            shell = phase == "shell"
            path = (host.shell_path if host.shell is not None else host.path) if shell else host.path
            where = ssh.Session(cwd=(host.cwd or host.home) if shell else host.home, path=path,
                                system_path=host.system_path(path), home=host.home, stdin=not shell,
                                asked=ssh.Asked())
            ssh.classify(op.connection, phase, op.details["line"], extra, session=where)
            paths, programs = await self._answers(session, where)
            where = dataclasses.replace(where, paths=paths, programs=programs, asked=None)
        c.operation = dataclasses.replace(ssh.classify(op.connection, phase, op.details["line"], extra,
                                                       session=where), payload=op.payload)
        if interactive := c.operation.details.get("interactive"):
            failclosed.refuse(f, 403, f"{', '.join(interactive)} is interactive: a line-based gate cannot govern "
                                      "what is typed into it; run a non-interactive command",
                              error=Error.INTERACTIVE_PROGRAM)

    async def _answers(self, session, where: ssh.Session) -> tuple[dict, dict]:
        """The host's answers to what the first pass asked: none when nothing was asked (no
        trip to the host's thread and back) or the host cannot answer, and the line is then
        judged unasked, which is stricter."""
        if not where.asked.paths and not where.asked.programs:
            return {}, {}
        try:
            return await self.executor.resolve(session, where.cwd, where.path, sorted(where.asked.paths),
                                               sorted(where.asked.programs, key=str))
        except HostError:
            return {}, {}
