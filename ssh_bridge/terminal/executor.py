"""executor: the terminal for ssh connections. It answers cleared ssh_bridge requests on
the real host, with the key only the gateway holds.

- `connect` and `close` are answered here, in the request hook, with SSH_RESULTS JSON
  (like pg_bridge's executor): a session (one per SSH client connection) keeps one
  connection to the host and belongs to the principal who opened it.
- `exec` and a shell line are stream steps (the bridge contract): a cleared one is sent on
  to the terminal's stream endpoint (ssh_bridge/terminal/stream.py) with a ticket for the
  job, and its frames then pass the chain's WebSocket hooks, masked and recorded.

Interactive programs never get here: the planner refuses them before any decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from mitmproxy import http

from addons import context, failclosed
from addons.engine.bridge import IDLE, SSH, SSH_RESULTS, SWEEP
from addons.engine.masks import parse_all
from addons.failclosed import guarded
from addons.settings import Settings
from ssh_bridge.terminal.backend import Host, HostError, Loop
from ssh_bridge.terminal.stream import TICKET, Endpoint, Job

logger = logging.getLogger(__name__)


@dataclass
class Session:
    owner: tuple[str, str]
    connection: str
    host: Host
    used: float = field(default_factory=time.monotonic)


def answer(error: str = "", event_id: str = "") -> bytes:
    doc = {"exit_status": 255 if error else 0, **({"error": error, "event_id": event_id} if error else {})}
    return json.dumps(doc, ensure_ascii=False).encode()


class SshExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sessions: dict[str, Session] = {}
        self.loop: Loop | None = None
        self.endpoint: Endpoint | None = None
        self._sweeper: asyncio.Task | None = None

    def session(self, session_id: str, principal, connection: str) -> Session | None:
        """The principal's own session on `connection`, if it has one."""
        s = self.sessions.get(session_id)
        if s is None or principal is None or s.owner != (principal.issuer, principal.subject) or s.connection != connection:
            return None
        return s

    async def resolve(self, session: Session, cwd: str | None, path: str | None, paths: list[str],
                      programs: list[tuple[str, str | None]]
                      ) -> tuple[dict[str, str], dict[tuple[str, str | None], tuple[str, str]]]:
        """The host's answers for the planner (backend.Host.resolve)."""
        return await self._host_loop().run(session.host.resolve(cwd, path, paths, programs))

    def _host_loop(self) -> Loop:
        if self.loop is None:
            self.loop = Loop()
        return self.loop

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
        conn = self.settings.registry.by_name[c.connection]
        op = c.operation
        phase, session_id = op.details["phase"], op.details["session"]
        owner = (c.principal.issuer, c.principal.subject)
        try:
            if phase == "connect":
                existing = self.sessions.get(session_id)
                if existing is not None and existing.owner != owner:
                    raise HostError("that session id belongs to another principal")
                host = await self._host_loop().run(Host.connect(conn))
                self.sessions[session_id] = Session(owner, conn.name, host)
                content = answer()
            else:
                session = self.session(session_id, c.principal, conn.name)
                if session is None:
                    raise HostError("no such session on the gateway (closed, or not yours); reconnect")
                session.used = time.monotonic()
                if phase == "close":
                    self._close(session_id)
                    content = answer()
                elif phase in SSH.streams and f.request.headers.get("upgrade", "").lower() == "websocket":
                    await self._stream(f, c, conn, session, op)
                    return
                else:
                    raise HostError(f"{phase} is a stream: ask for a WebSocket upgrade (addons/engine/bridge.py)")
        except HostError as e:
            content = answer(f"custody: {e}", c.decision_event)
        f.response = http.Response.make(200, content, {"content-type": SSH_RESULTS})

    async def _stream(self, f: http.HTTPFlow, c, conn, session: Session, op) -> None:
        """Send the cleared stream step on to the endpoint, with a ticket for its job."""
        loop = self._host_loop()
        if self.endpoint is None:
            endpoint = Endpoint()
            await loop.run(endpoint.start())
            self.endpoint = endpoint
        masked = bool(parse_all(context.response_masks(c)))
        body = op.payload
        job = Job(session.host, op.details["phase"], body["command"],
                  body.get("terminal") if isinstance(body.get("terminal"), dict) else None,
                  conn.max_output_bytes, conn.command_timeout,
                  self.settings.require().masking.max_record if masked else None, c.decision_event)
        f.request.scheme, f.request.host, f.request.port = "http", "127.0.0.1", self.endpoint.port
        f.request.headers[TICKET] = self.endpoint.admit(job)
        c.destination = (f.request.host, f.request.port)
