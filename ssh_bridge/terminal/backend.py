"""The real host, over SSH with the key only the gateway holds.

asyncssh hangs during authentication on an event loop with an eager task factory, which
mitmproxy installs; so every asyncssh call runs on an event loop of its own, in a thread
(`Loop`), and the gateway's loop awaits the results. The host key is pinned by the
connection's known_hosts: an unknown or changed key fails the connection, never learned.

A session holds one connection to the host; its shell is one persistent `bash` whose
every line is run as `eval '<line>' </dev/null`, followed by markers that carry the exit
status, so `cd` and variables persist while each line is governed on its own and no
command can read what comes after it.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from addons.engine.config import Connection


class HostError(Exception):
    """The host could not be reached or refused us; the message says why."""


class Loop:
    """An event loop in a thread of its own, for asyncssh."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="custody-ssh", daemon=True)
        self.thread.start()

    async def run(self, coro) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    exit_status: int = 0
    capped: bool = False
    ended: bool = False
    cwd: str | None = None

    def as_dict(self) -> dict[str, Any]:
        try:
            out = {"stdout": self.stdout.decode(), "stderr": self.stderr.decode(), "encoding": "utf-8"}
        except UnicodeDecodeError:
            out = {"stdout": base64.b64encode(self.stdout).decode(), "stderr": base64.b64encode(self.stderr).decode(),
                   "encoding": "base64"}
        return {**out, "exit_status": self.exit_status, "capped": self.capped, "ended": self.ended}


def timeout_message(seconds: float) -> bytes:
    return f"\ncustody: the command ran longer than {seconds:g} s and was stopped\n".encode()


def cap_message(limit: int) -> bytes:
    return f"\ncustody: the output passed {limit} bytes; the command was stopped and the rest not sent\n".encode()


@dataclass
class Host:
    """One connection to the real host (lives on the `Loop`)."""

    conn: asyncssh.SSHClientConnection
    home: str | None = None
    shell: asyncssh.SSHClientProcess | None = None
    cwd: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    async def connect(cls, c: Connection) -> Host:
        try:
            key = asyncssh.import_private_key(c.credential.value)
            conn = await asyncio.wait_for(asyncssh.connect(
                c.upstream.host, c.upstream.port, username=c.upstream.database, client_keys=[key],
                known_hosts=c.known_hosts, agent_path=None, agent_forwarding=False, x11_forwarding=False,
                password=None, kbdint_auth=False, config=None), 20)
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostError(f"the host key of {c.upstream.host}:{c.upstream.port} does not match known_hosts "
                            f"({e.reason}); refusing to connect") from None
        except (OSError, asyncssh.Error, TimeoutError, ValueError) as e:
            raise HostError(f"cannot reach {c.upstream.host}:{c.upstream.port}: {getattr(e, 'reason', '') or e}") from None
        home = (await conn.run("pwd", check=False)).stdout  # where exec commands start
        return cls(conn, home=home.strip() or None if isinstance(home, str) else None)

    async def exec(self, command: str, stdin: bytes, limit: int, seconds: float) -> Result:
        async with self.lock:
            try:
                return await asyncio.wait_for(self._exec(command, stdin, limit), seconds)
            except TimeoutError:
                return Result(stderr=timeout_message(seconds), exit_status=124)

    async def _exec(self, command: str, stdin: bytes, limit: int) -> Result:
        process = await self.conn.create_process(command, encoding=None)
        if stdin:
            process.stdin.write(stdin)
        process.stdin.write_eof()
        result = Result()
        out, err = bytearray(), bytearray()

        async def pump(stream, buffer: bytearray) -> None:
            while chunk := await stream.read(65536):
                buffer += chunk
                if len(out) + len(err) > limit:
                    result.capped = True
                    process.close()
                    return

        try:
            await asyncio.gather(pump(process.stdout, out), pump(process.stderr, err))
        finally:
            process.close()  # also when stopped for taking too long
        await process.wait_closed()
        result.stdout, result.stderr = bytes(out[:limit]), bytes(err[:limit])
        if result.capped:
            result.stderr += cap_message(limit)
            result.exit_status = 255
        else:
            result.exit_status = process.exit_status if process.exit_status is not None else 255
        return result

    async def line(self, line: str, limit: int, seconds: float) -> Result:
        """Run one line in the session's persistent shell; one that runs longer than
        `seconds` is stopped with the shell (its directory and variables are lost)."""
        async with self.lock:
            try:
                return await asyncio.wait_for(self._line(line, limit), seconds)
            except TimeoutError:
                if self.shell is not None:
                    self.shell.close()
                    self.shell, self.cwd = None, None
                return Result(stderr=timeout_message(seconds), exit_status=124, ended=False)

    async def _line(self, line: str, limit: int) -> Result:
        if self.shell is None:
            self.shell = await self.conn.create_process("exec bash --noprofile --norc", encoding=None)
            self.cwd = self.home
        mark = f"__custody_{secrets.token_hex(8)}__".encode()
        script = (f"eval {_quote(line)} </dev/null\n"
                  f"printf '\\n%s %d %s\\n' {mark.decode()} $? \"$PWD\"\nprintf '%s\\n' {mark.decode()} >&2\n")
        self.shell.stdin.write(script.encode())
        result = Result()
        reads = [asyncio.ensure_future(_until(self.shell.stdout, b"\n" + mark + b" ", limit, True)),
                 asyncio.ensure_future(_until(self.shell.stderr, mark + b"\n", limit, False))]
        first, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        if any(t.result()[1] is None for t in first):
            self.shell.close()  # ended, or too much output: the other stream ends too
        (out, status), (err, err_done) = [await t for t in reads]
        if isinstance(status, tuple):
            status, self.cwd = status
        if status is None or err_done is None:  # the shell ended (exit) or was stopped
            if len(out) + len(err) >= limit:
                result.capped = True
                err = err[:limit] + cap_message(limit)
            result.ended = True
            self.shell.close()
            await self.shell.wait_closed()
            code = self.shell.exit_status
            result.exit_status = 255 if result.capped or code is None else code
            self.shell, self.cwd = None, None
        else:
            result.exit_status = status
        result.stdout, result.stderr, result.cwd = out, err, self.cwd
        return result

    def close(self) -> None:
        self.conn.close()


def _quote(line: str) -> str:
    return "'" + line.replace("'", "'\"'\"'") + "'"


async def _until(stream, mark: bytes, limit: int, with_status: bool) -> tuple[bytes, int | None]:
    """Read up to `mark` (on stdout the exit status follows it on its line); None as the
    status when the stream ended first or passed `limit`."""
    buffer = bytearray()
    while True:
        at = buffer.find(mark)
        if at >= 0:
            if not with_status:
                return bytes(buffer[:at]), 0
            end = buffer.find(b"\n", at + len(mark))
            if end >= 0:  # "<status> <working directory>"
                status, _, cwd = bytes(buffer[at + len(mark):end]).decode(errors="replace").partition(" ")
                return bytes(buffer[:at]), (int(status or 0), cwd or None)
        elif len(buffer) > limit + len(mark):
            return bytes(buffer[:limit]), None
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(buffer), None
        buffer += chunk
