"""executor: the terminal for ssh connections. It answers cleared ssh_bridge requests
itself, on the real host, with the key only the gateway holds.

Like pg_bridge's executor it sets `flow.response` in the request hook, so masking and the
recorder still run on the output. The response is SSH_RESULTS JSON: stdout and stderr
(text, or base64 when they are not UTF-8), the exit status, whether the output was capped
and whether the shell ended. A session (one per SSH client connection) keeps one
connection to the host, and belongs to the principal who opened it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field

from mitmproxy import http

from addons import context, failclosed
from addons.engine.bridge import IDLE, SSH_RESULTS, SWEEP
from addons.failclosed import guarded
from addons.settings import Settings
from ssh_bridge.terminal.backend import Host, HostError, Loop, Result

logger = logging.getLogger(__name__)


@dataclass
class Session:
    owner: tuple[str, str]
    connection: str
    host: Host
    used: float = field(default_factory=time.monotonic)


def answer(result: Result | None = None, error: str = "") -> bytes:
    doc = (result or Result(exit_status=255)).as_dict()
    if error:
        doc["error"] = error
    return json.dumps(doc, ensure_ascii=False).encode()


class SshExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.loop: Loop | None = None
        self._sweeper: asyncio.Task | None = None

    def directory(self, session_id: str, principal, connection: str, phase: str) -> str | None:
        """Where the session's next command runs on the host: its shell's directory for a
        shell line, the login directory for an exec; None when unknown."""
        s = self.sessions.get(session_id)
        if s is None or principal is None or s.owner != (principal.issuer, principal.subject) or s.connection != connection:
            return None
        return (s.host.cwd or s.host.home) if phase == "shell" else s.host.home

    def running(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def _sweep(self) -> None:
        """Close host connections of sessions idle longer than IDLE (a bridge that vanished
        without `close`), as pg_bridge's sessions do."""
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            for session_id, s in list(self.sessions.items()):
                if now - s.used > IDLE and not s.host.lock.locked():
                    self._close(session_id)

    def _close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None and self.loop is not None:
            self.loop.loop.call_soon_threadsafe(s.host.close)

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self.loop is not None:
            for s in self.sessions.values():
                self.loop.loop.call_soon_threadsafe(s.host.close)
            self.loop.stop()

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "ssh" or not c.cleared:
            return  # not ours, or the gate refuses it
        if self.loop is None:
            self.loop = Loop()
        conn = self.settings.registry.by_name[c.connection]
        op = c.operation
        phase, session_id, body = op.details["phase"], op.details["session"], op.payload
        owner = (c.principal.issuer, c.principal.subject)
        try:
            if phase == "connect":
                existing = self.sessions.get(session_id)
                if existing is not None and existing.owner != owner:
                    raise HostError("that session id belongs to another principal")
                host = await self.loop.run(Host.connect(conn))
                self.sessions[session_id] = Session(owner, conn.name, host)
                content = answer(Result())
            else:
                session = self.sessions.get(session_id)
                if session is None or session.owner != owner or session.connection != conn.name:
                    raise HostError("no such session on the gateway (closed, or not yours); reconnect")
                session.used = time.monotonic()
                content = await self._step(conn, session_id, session, phase, body, op)
        except HostError as e:
            content = answer(error=f"custody: {e}")
        f.response = http.Response.make(200, content, {"content-type": SSH_RESULTS})

    async def _step(self, conn, session_id: str, session: Session, phase: str, body: dict, op) -> bytes:
        if phase == "close":
            self._close(session_id)
            return answer(Result())
        interactive = sorted({p.details["program"] for p in op.parts if p.details.get("interactive")})
        if interactive:
            return answer(Result(stderr=f"custody: {', '.join(interactive)} is interactive: a line-based gate cannot "
                                        "govern what is typed into it; run a non-interactive command\n".encode(),
                                 exit_status=126))
        stdin = base64.b64decode(body.get("stdin", "") or "")
        try:
            if phase == "exec":
                result = await self.loop.run(session.host.exec(body["command"], stdin, conn.max_output_bytes,
                                                               conn.command_timeout))
            else:
                result = await self.loop.run(session.host.line(body["command"], conn.max_output_bytes,
                                                               conn.command_timeout))
        except Exception as e:  # the host connection broke: the session is over
            self.sessions.pop(session_id, None)
            raise HostError(f"the connection to the host failed: {type(e).__name__}: {e}") from None
        return answer(result)
