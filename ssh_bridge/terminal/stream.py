"""The terminal's end of stream steps: where a cleared exec or shell line runs while its
input and output flow.

mitmproxy relays a WebSocket only between a client and a server it connected to, so the
terminal is a server: a loopback listener on the host loop's thread (backend.Loop). The
executor sends each cleared stream step here as the flow's upstream, with a one-time
ticket that names the job it admitted; a request without a valid ticket gets 403 and
nothing runs. The job then runs on the host, the frames of the bridge contract
(addons/engine/bridge.py) flowing both ways through the gateway's WebSocket hooks, which
mask and record each one.

Output is sent as it comes. When masks apply it is sent in records (TextRecords: lines,
PEM blocks whole), so that the masker sees every secret whole: output that is not text,
or a line longer than the masker takes, stops the command with the reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import asyncssh
from wsproto.connection import ConnectionType

from addons.engine.bridge import (
    RESIZE,
    SIGNAL,
    STATUS,
    STDERR,
    STDIN,
    STDOUT,
    Frames,
    read_fields,
    websocket_accept,
)
from addons.engine.masks import MaskError, TextRecords
from ssh_bridge.terminal.backend import Host, line_script, line_status

logger = logging.getLogger(__name__)
TICKET = "x-custody-ticket"
TICKET_TTL = 30.0
SIGNALS = frozenset("INT TERM HUP QUIT KILL USR1 USR2".split())


class Stopped(Exception):
    """The job was stopped; the message says why (sent to the client with the status)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """What the executor admitted: run `command` in `host` (an exec, or a line of its shell)."""

    host: Host
    phase: str
    command: str
    terminal: dict | None
    limit: int
    seconds: float
    records: int | None
    """The longest record masking takes when masks apply (output is then sent in records); None: no masks."""
    event_id: str
    created: float = field(default_factory=time.monotonic)


class Peer(Frames):
    """The gateway's side of one stream: frames in and out over mitmproxy's connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer, ConnectionType.SERVER)

    async def status(self, doc: dict) -> None:
        try:
            await self.send(STATUS, json.dumps(doc).encode())
        except ConnectionError:
            pass  # the client went away: nobody to tell


class Output:
    """The job's output on its way out: counted against the limit and, when masks apply,
    cut into records."""

    def __init__(self, peer: Peer, job: Job) -> None:
        self.peer, self.job, self.sent = peer, job, 0
        self.records = {STDOUT: TextRecords(job.records), STDERR: TextRecords(job.records)} if job.records else None

    async def write(self, channel: int, chunk: bytes) -> None:
        if self.sent + len(chunk) > self.job.limit:
            chunk = chunk[:self.job.limit - self.sent]
            await self._send(channel, self._framed(channel, chunk) + self._flushed(channel))
            raise Stopped(f"custody: the output passed {self.job.limit} bytes; the command was stopped and the rest "
                          "not sent", 255)
        self.sent += len(chunk)
        await self._send(channel, self._framed(channel, chunk))

    async def flush(self, channel: int) -> None:
        await self._send(channel, self._flushed(channel))

    def _framed(self, channel: int, chunk: bytes) -> bytes:
        return self.records[channel].feed(chunk) if self.records else chunk

    def _flushed(self, channel: int) -> bytes:
        return self.records[channel].flush() if self.records else b""

    async def _send(self, channel: int, data: bytes) -> None:
        if data:
            await self.peer.send(channel, data)


class Endpoint:
    """The loopback listener stream steps run behind (on the host loop)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()  # the executor admits on the gateway's loop; jobs start on the host loop
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def admit(self, job: Job) -> str:
        """A one-time ticket for `job` (forgotten after TICKET_TTL if never used)."""
        now, ticket = time.monotonic(), secrets.token_urlsafe(32)
        with self.lock:
            for stale in [t for t, j in self.jobs.items() if now - j.created > TICKET_TTL]:
                del self.jobs[stale]
            self.jobs[ticket] = job
        return ticket

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            job, key = await self._handshake(reader, writer)
            if job is None:
                return
            peer = Peer(reader, writer)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                         + f"sec-websocket-accept: {websocket_accept(key)}\r\n\r\n".encode())
            await writer.drain()
            try:
                await (run_exec(job, peer) if job.phase == "exec" else run_line(job, peer))
            except asyncssh.Error as e:  # the host went away: its connection lost, a channel refused
                await _host_lost(peer, e, job)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            logger.info("custody: a stream ended early: %s", e)
        except Exception:
            logger.exception("custody: a stream failed")
        finally:
            writer.close()

    async def _handshake(self, reader, writer) -> tuple[Job | None, str]:
        await reader.readuntil(b"\r\n")  # the request line: the ticket says what to run
        fields = await read_fields(reader)
        await reader.readexactly(int(fields.get("content-length", "0")))
        with self.lock:
            job = self.jobs.pop(fields.get(TICKET, ""), None)
        if job is None or time.monotonic() - job.created > TICKET_TTL or not fields.get("sec-websocket-key"):
            writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return None, ""
        return job, fields["sec-websocket-key"]


async def run_exec(job: Job, peer: Peer) -> None:
    """An exec: its own process on the host, input streamed to it until the client's EOF,
    output streamed back, then the exit status."""
    process = await job.host.process(job.command, job.terminal)
    out = Output(peer, job)

    async def pump(stream, channel: int) -> None:
        while chunk := await stream.read(65536):
            await out.write(channel, chunk)
        await out.flush(channel)

    feeding = asyncio.ensure_future(_feed(peer, process))
    try:
        await asyncio.wait_for(asyncio.gather(pump(process.stdout, STDOUT), pump(process.stderr, STDERR)), job.seconds)
        await process.wait_closed()
        await peer.status({"exit_status": 255 if process.exit_status is None else process.exit_status})
    except TimeoutError:
        await _stopped(peer, Stopped(f"custody: the command ran longer than {job.seconds:g} s and was stopped", 124),
                       job)
    except (Stopped, MaskError) as e:
        await _stopped(peer, e, job)
    finally:
        feeding.cancel()
        process.close()


async def _feed(peer: Peer, process) -> None:
    """The client's frames to the process: input (empty: EOF), window size, signals. The
    stream ending (the client went away) stops the process."""
    while (frame := await peer.receive()) is not None:
        channel, data = frame
        if channel == STDIN:
            if data:
                process.stdin.write(data)
            else:
                process.stdin.write_eof()
        elif channel == RESIZE:
            size = json.loads(data or b"{}")
            process.change_terminal_size(int(size.get("cols") or 80), int(size.get("rows") or 24))
        elif channel == SIGNAL and data.decode(errors="replace") in SIGNALS:
            process.send_signal(data.decode())
    process.close()


async def _host_lost(peer: Peer, e: asyncssh.Error, job: Job) -> None:
    """The host's connection failed under the session: nothing more runs there; the client
    is told so and its session ends (a new one connects to the host again)."""
    job.host.shell_lost()
    message = (f"custody: the connection to the SSH host was lost ({e.reason or type(e).__name__}); "
               "the command did not run: reconnect")
    await peer.status({"exit_status": 255, "error": message, "ended": True, "event_id": job.event_id})


async def _stopped(peer: Peer, e: Exception, job: Job) -> None:
    status = e.status if isinstance(e, Stopped) else 126
    message = str(e) if isinstance(e, Stopped) else f"custody: {e}; the command was stopped"
    try:
        await peer.send(STDERR, f"\n{message}\n".encode())
    except ConnectionError:
        return
    await peer.status({"exit_status": status, "error": message if status == 126 else "", "event_id": job.event_id,
                       "capped": status == 255})


async def run_line(job: Job, peer: Peer) -> None:
    """A line of the session's shell, its output streamed until the markers; SIGNAL frames
    interrupt it. A line that runs too long is stopped with the shell."""
    host = job.host
    async with host.lock:
        shell = await host.line_shell()
        mark = f"__custody_{secrets.token_hex(8)}__"
        shell.stdin.write(line_script(job.command, mark))
        out = Output(peer, job)
        signals = asyncio.ensure_future(_signals(peer, shell))
        try:
            (tail, _) = await asyncio.wait_for(asyncio.gather(
                _until(shell.stdout, f"\n{mark} ".encode(), b"\n", out, STDOUT),
                _until(shell.stderr, f"{mark}\n".encode(), b"", out, STDERR)), job.seconds)
            if tail is None:  # the shell ended (exit, exec)
                await shell.wait_closed()
                code = shell.exit_status
                host.shell_lost()
                await peer.status({"exit_status": 255 if code is None else code, "ended": True})
                return
            status, host.cwd, host.shell_path = line_status(tail)
            await peer.status({"exit_status": status, "cwd": host.cwd})
        except TimeoutError:
            host.shell_lost()
            await _stopped(peer, Stopped(f"custody: the command ran longer than {job.seconds:g} s and was stopped",
                                         124), job)
        except (Stopped, MaskError) as e:
            host.shell_lost()
            await _stopped(peer, e, job)
        finally:
            signals.cancel()


async def _signals(peer: Peer, shell: asyncssh.SSHClientProcess) -> None:
    """Signals the client sends while a shell line runs (Ctrl-C); input is not the line's."""
    while (frame := await peer.receive()) is not None:
        channel, data = frame
        if channel == SIGNAL and data.decode(errors="replace") in SIGNALS:
            shell.send_signal(data.decode())


async def _until(stream, mark: bytes, end: bytes, out: Output, channel: int) -> bytes | None:
    """Stream output up to `mark`, holding back only what could be the start of it; then
    read on to `end` and return what follows the mark (None when the stream ended first)."""
    buffer = bytearray()
    while True:
        at = buffer.find(mark)
        if at >= 0:
            await out.write(channel, bytes(buffer[:at]))
            await out.flush(channel)
            rest = buffer[at + len(mark):]
            while end and end not in rest:
                chunk = await stream.read(65536)
                if not chunk:
                    return None
                rest += chunk
            return bytes(rest[:rest.index(end)]) if end else b""
        keep = next((k for k in range(min(len(mark) - 1, len(buffer)), 0, -1) if buffer.endswith(mark[:k])), 0)
        if len(buffer) > keep:
            await out.write(channel, bytes(buffer[:len(buffer) - keep]))
            del buffer[:len(buffer) - keep]
        chunk = await stream.read(65536)
        if not chunk:
            await out.write(channel, bytes(buffer))
            await out.flush(channel)
            return None
        buffer += chunk
