"""An MCP server the gateway runs itself, over the stdio transport: newline-delimited
JSON-RPC messages on the process's stdin and stdout (modelcontextprotocol.io, "stdio").

The process gets a small environment (PATH, HOME, locale) plus the connection's own `env`
and `secrets`; nothing else of the gateway's. Its stderr is drained into the gateway's log
with the secrets taken out. The process cannot ask the agent anything (there is no stream
to the agent to carry it): a `ping` is answered, any other request of the server's gets a
JSON-RPC error; its notifications are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from typing import Any

from addons.engine import mcp
from addons.engine.config import StdioServer

logger = logging.getLogger(__name__)

BASE_ENVIRONMENT = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
NOT_HERE = ("the gateway runs this MCP server itself and has no way to ask the agent: the server's requests to "
            "the client (sampling, elicitation, roots) are refused")


class StdioError(Exception):
    """The process could not be started, stopped answering, or is gone."""


class StdioProcess:
    """One server process, for one MCP session."""

    def __init__(self, spec: StdioServer, process: asyncio.subprocess.Process, secrets: tuple[str, ...]) -> None:
        self.spec, self.process, self.secrets = spec, process, secrets
        self.waiting: dict[str, asyncio.Future] = {}
        self.used = time.monotonic()
        self.refused = 0
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._drain_stderr())]

    @classmethod
    async def start(cls, spec: StdioServer, max_line: int) -> StdioProcess:
        env = {k: os.environ[k] for k in BASE_ENVIRONMENT if k in os.environ} | dict(spec.env) | dict(spec.secrets)
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=spec.cwd, limit=max_line, start_new_session=True)
        except OSError as e:
            raise StdioError(f"the MCP server could not be started: {e.strerror or e}") from None
        return cls(spec, process, tuple(v for _, v in spec.secrets))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def exchange(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write `messages` and wait for the answer to each request among them, in order."""
        self.used = time.monotonic()
        if not self.alive:
            raise StdioError(f"the MCP server exited ({self.process.returncode})")
        loop = asyncio.get_running_loop()
        keys = [mcp.id_key(m["id"]) for m in messages if "method" in m and "id" in m]
        if any(k in self.waiting for k in keys):
            raise StdioError("a request with this id is already waiting for its answer")
        futures = {k: self.waiting.setdefault(k, loop.create_future()) for k in keys}
        try:
            for m in messages:
                self.process.stdin.write(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
            await self.process.stdin.drain()
            if not futures:
                return []
            _, pending = await asyncio.wait(futures.values(), timeout=self.spec.timeout)
            if pending:
                raise StdioError(f"the MCP server did not answer within {self.spec.timeout:g}s")
            return [futures[k].result() for k in keys]
        except (BrokenPipeError, ConnectionResetError):
            raise StdioError(f"the MCP server exited ({self.process.returncode})") from None
        finally:
            for k in keys:
                self.waiting.pop(k, None)

    async def _read(self) -> None:
        try:
            while line := await self.process.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    logger.warning("custody: an MCP stdio server wrote a line that is not JSON; ignored")
                    continue
                if isinstance(message, dict):
                    await self._received(message)
        except (ValueError, asyncio.LimitOverrunError):
            logger.error("custody: an MCP stdio server wrote a line longer than the gateway accepts; stopping it")
            self.process.kill()
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(StdioError("the MCP server exited before it answered"))

    async def _received(self, message: dict[str, Any]) -> None:
        if "method" not in message:
            future = self.waiting.get(mcp.id_key(message.get("id")))
            if future is not None and not future.done():
                future.set_result(message)
            return
        if "id" not in message:
            return  # a notification: nobody to give it to
        if message["method"] == "ping":
            reply = {"jsonrpc": mcp.JSONRPC, "id": message["id"], "result": {}}
        else:
            self.refused += 1
            reply = mcp.answer(message["id"], mcp.error_object(mcp.REFUSED, f"custody: {NOT_HERE}"))
        self.process.stdin.write(json.dumps(reply).encode() + b"\n")
        await self.process.stdin.drain()

    async def _drain_stderr(self) -> None:
        while line := await self.process.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            for s in self.secrets:
                if s:
                    text = text.replace(s, "[REDACTED]")
            logger.debug("custody: mcp stdio server: %s", text)

    def kill(self) -> None:
        """Stop the process at once (the gateway is stopping)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        for task in self._tasks:
            task.cancel()
