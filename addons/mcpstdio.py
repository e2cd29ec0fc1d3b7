"""mcpstdio: the terminal for MCP servers the gateway runs itself (`mcp.stdio`: `npx …`,
`uvx …`), exposed to agents as the connection's Streamable HTTP endpoint.

An `initialize` without a session starts a process (one per MCP session, at most
`max_sessions` per connection) with the environment only the gateway sees, and the answer
names the new session in `Mcp-Session-Id` (which the MCP addon binds to the principal).
Every cleared POST of that session is written to the process and answered, as JSON, with
the process's answers to its requests (202 when it carried none); DELETE ends the session
and the process; GET is 405 (there is no stream from the process to the agent). It answers
the flow in the request hook, so nothing goes upstream and the response hooks — the MCP
addon's filtering and masking, then the recorder — still run. Its own failures (the
process would not start, died, or did not answer in time) are JSON-RPC errors the client
surfaces; a session whose process is gone is 404, so the client starts a new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from mitmproxy import http

from addons import context, failclosed
from addons.engine import mcp
from addons.engine.config import Connection
from addons.engine.stdio import StdioError, StdioProcess
from addons.failclosed import guarded
from addons.settings import Settings

logger = logging.getLogger(__name__)
SWEEP = 30.0


def answer_with(status: int, document, headers: dict[str, str] | None = None) -> http.Response:
    body = b"" if document is None else json.dumps(document, ensure_ascii=False).encode()
    return http.Response.make(status, body, {**({"content-type": "application/json"} if body else {}),
                                             **(headers or {})})


class McpStdio:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes: dict[tuple[str, str], StdioProcess] = {}
        self._sweeper: asyncio.Task | None = None

    def running(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        """mitmproxy calls this synchronously (on exit, and when a script reloads): stop them now."""
        if self._sweeper:
            self._sweeper.cancel()
        for process in self.processes.values():
            process.kill()
        self.processes.clear()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            for key, process in list(self.processes.items()):
                conn = self.settings.registry.by_name.get(key[0])
                idle = conn.mcp.stdio.idle if conn is not None and conn.mcp and conn.mcp.stdio else 0.0
                if not process.alive or now - process.used > idle:
                    await self._end(key)

    async def _end(self, key: tuple[str, str]) -> None:
        process = self.processes.pop(key, None)
        if process is not None:
            await process.close()

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "mcp" or not c.cleared:
            return  # not ours, or the gate refuses it
        conn = self.settings.registry.by_name[c.connection]
        if conn.mcp is None or conn.mcp.stdio is None:
            return
        op = c.operation
        sid = op.details.get("session", "")
        if op.details["http"] == "GET":
            f.response = http.Response.make(405, b"", {"allow": "POST, DELETE"})
            return
        if op.details["http"] == "DELETE":
            await self._end((conn.name, sid))
            f.response = http.Response.make(200 if sid else 400, b"")
            return
        doc = json.loads(f.request.get_content())
        messages = doc if isinstance(doc, list) else [doc]
        requests = [m for m in messages if "method" in m and "id" in m]
        headers: dict[str, str] = {}
        if not sid and op.details.get("method") == "initialize":
            try:
                sid = await self._start(conn)
            except StdioError as e:
                f.response = answer_with(200, self._errors(requests, doc, f"custody: {e}"))
                return
            headers["mcp-session-id"] = sid
        process = self.processes.get((conn.name, sid))
        if process is None:
            f.response = answer_with(404, self._errors(requests, doc, "custody: the MCP session ended (its server "
                                                                      "process is gone); initialize a new session"))
            return
        try:
            answers = await process.exchange(messages)
        except StdioError as e:
            logger.error("custody: MCP stdio server of %s: %s", conn.name, e)
            f.response = answer_with(200, self._errors(requests, doc, f"custody: {e}"))
            return
        if not requests:
            f.response = answer_with(202, None, headers)
        else:
            f.response = answer_with(200, answers if isinstance(doc, list) else answers[0], headers)

    async def _start(self, conn: Connection) -> str:
        spec = conn.mcp.stdio
        if sum(1 for (name, _), p in self.processes.items() if name == conn.name and p.alive) >= spec.max_sessions:
            raise StdioError(f"{conn.name} already has {spec.max_sessions} sessions (mcp.stdio.max_sessions); "
                             "end one first")
        process = await StdioProcess.start(spec, self.settings.require().masking.max_body)
        sid = secrets.token_hex(16)
        self.processes[(conn.name, sid)] = process
        return sid

    @staticmethod
    def _errors(requests: list[dict], doc, message: str):
        errors = [mcp.answer(m["id"], mcp.error_object(mcp.INTERNAL_ERROR, message)) for m in requests] or \
            [mcp.answer(None, mcp.error_object(mcp.INTERNAL_ERROR, message))]
        return errors if isinstance(doc, list) else errors[0]
