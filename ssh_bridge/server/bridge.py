"""ssh_bridge: an SSH server for unmodified clients, whose every command is an HTTP request
through the gateway.

An agent logs in with its OIDC JWT as the password (or the answer to a keyboard-interactive
prompt); the bridge asks the gateway to open a session (`POST /connect` to the connection's
host, the token as Proxy-Authorization) and accepts the login only if the gateway does. A
refused login says why in an authentication banner (clients print it before "Permission
denied"): the reason and the audit event. The user name selects the connection:
`anything+prod-web` is connection `prod-web`; with one ssh connection on a listen address,
any user name means that one.

- An `exec` request is one stream step (addons/engine/bridge.py): once the gateway clears
  it, standard input flows to the command until the client's EOF, however late or long,
  and its output flows back as it is produced, then its exit status. `ssh -t` gets a
  terminal on the host (the window size follows the client's).
- A shell (with or without a PTY) is read line by line; each line is one stream step, run
  in the session's one persistent shell on the host, so `cd` persists. With a PTY the
  bridge echoes and edits the line itself (backspace, Ctrl-C, Ctrl-D); Ctrl-C on a running
  line interrupts it, and on a line held for approval withdraws it (the gateway sees the
  request go and abandons the approval).
- scp (its legacy protocol, `scp -O`) and `rsync -e ssh` are exec requests like any other
  (`scp -t`/`-f`, `rsync --server`, classified as the writes and reads they are); their
  data is binary, so a rule that masks their output refuses them. The sftp subsystem
  (and so scp's default mode) is refused with a message the client prints; other
  subsystems, port forwarding, agent forwarding and X11 are refused.

A refused command prints `custody: <reason>` (and its audit event) on stderr, or on the
terminal in a PTY session, as a shell would, and exits with status 126; a session whose
link to its gateway broke prints why and exits with status 255.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh

from addons.engine.bridge import (
    RESIZE,
    SIGNAL,
    SSH,
    STATUS,
    STDERR,
    STDIN,
    STDOUT,
    Link,
    LinkLost,
    Refusal,
    Stream,
    Unreachable,
    attributes_from,
    step,
)
from addons.engine.config import Connection
from ssh_bridge.server.idle import Idle

logger = logging.getLogger(__name__)
REFUSED = 126
SFTP_REFUSED = ("custody: the sftp subsystem is not governed by this gateway; use `scp -O` (the legacy scp "
                "protocol) or `rsync -e ssh`, which run as governed commands")


class Refused(Exception):
    """The gateway (or the host) said no; the message is for the agent."""


def refused(e: Refusal | Unreachable) -> Refused:
    if isinstance(e, Unreachable):
        return Refused(str(e))
    body = e.body or {}
    if e.status == 200 and body.get("error"):  # the terminal's own answer: the host failed
        return Refused(body["error"] + (f" (audit event: {body['event_id']})" if body.get("event_id") else ""))
    return Refused(e.reason + (f" ({e.detail})" if e.detail else ""))


class Gateway:
    """The bridge's requests, through the gateway's proxy port, to a connection's host."""

    def __init__(self, proxy: tuple[str, int]) -> None:
        self.proxy = proxy

    async def call(self, link: Link, host: str, phase: str, token: str, session: str, body: dict) -> dict[str, Any]:
        try:
            doc = await step(link, SSH, host, phase, token, session, body)
        except LinkLost:
            raise  # the session is over (Bridge._process)
        except (Unreachable, Refusal) as e:
            raise refused(e) from None
        if doc.get("error"):
            raise refused(Refusal(200, doc))
        return doc

    async def stream(self, link: Link, host: str, phase: str, token: str, session: str, body: dict) -> Stream:
        try:
            return await Stream.open(link, SSH, host, phase, token, session, body)
        except LinkLost:
            raise  # the session is over (Bridge._process)
        except (Unreachable, Refusal) as e:
            raise refused(e) from None


class Server(asyncssh.SSHServer):
    """One client connection: authentication through the gateway, forwarding refused."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.session = secrets.token_hex(16)
        self.token = ""
        self.connection: Connection | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer: tuple | None = None
        self.link = Link(*bridge.gateway.proxy)
        self.waiting: set[asyncio.Task] = set()
        """Stream steps waiting for the gateway (held for approval): withdrawn if the client goes."""
        self.idle = Idle(bridge.limits.idle, self._idle_out)
        self.login = Idle(bridge.limits.authenticate, self._login_out)
        """limits.authenticate: the client's time to log in; the gateway's time checking its
        token does not count (as pg_bridge's, and PostgreSQL's authentication_timeout)."""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn, self.peer = conn, conn.get_extra_info("peername")
        if not self.bridge.admit(self):
            reason = f"custody: too many connections ({self.bridge.limits.connections}, limits.connections)"
            logger.info("ssh_bridge: refusing a connection from %s: %s", self.peer, reason)
            # once asyncssh has sent its version (right after this returns), before any key
            # exchange: the reason goes in the clear, for a client that reads it in time
            asyncio.get_running_loop().call_soon(conn.disconnect, asyncssh.DISC_TOO_MANY_CONNECTIONS, reason)
            return
        self.idle.touch()
        self.login.touch()

    def _login_out(self) -> None:
        logger.info("ssh_bridge: %s: no login within %gs; disconnected", self.peer, self.bridge.limits.authenticate)
        self.conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                             f"custody: no login within {self.bridge.limits.authenticate:g}s (limits.authenticate)")

    def _idle_out(self) -> None:
        logger.info("ssh_bridge: closing an idle connection (%gs)", self.bridge.limits.idle)
        self.conn.disconnect(asyncssh.DISC_BY_APPLICATION,
                             f"custody: nothing ran for {self.bridge.limits.idle:g}s (limits.idle); disconnected")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.token:
            logger.info("ssh_bridge: %s gone before logging in: %s", self.peer, exc)
        self.idle.stop()
        self.login.stop()
        self.bridge.clients.discard(self)
        for task in list(self.waiting):
            task.cancel()
        if self.token and self.connection is not None:
            self.bridge.close_later(self)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
        return "Custody", "Answer with your agent token.", "", [("Token: ", False)]

    async def validate_kbdint_response(self, username: str, responses: list[str]) -> bool:
        return bool(responses) and await self.validate_password(username, responses[0])

    async def validate_password(self, username: str, password: str) -> bool:
        connection = self.bridge.select(username)
        if connection is None:
            self._banner(f"custody: no ssh connection is named by the user {username!r} on this address "
                         f"(connections: {', '.join(self.bridge.names)}; log in as agent+<connection>)")
            return False
        if not password:
            return False
        try:
            with self.login.busy(), self.idle.busy():  # a login under way is neither late nor idle
                await self.bridge.gateway.call(self.link, connection.hosts[0].split(":")[0], "connect",
                                               password.strip(), self.session, {"user": username})
        except Refused as e:
            logger.info("ssh_bridge: login refused for %s: %s", username, e)
            self._banner(str(e))
            return False
        self.login.stop()
        self.token, self.connection = password.strip(), connection
        return True

    def _banner(self, message: str) -> None:
        """Why a login failed, before the client says "Permission denied"."""
        try:
            self.conn.send_auth_banner(message + "\r\n")
        except (OSError, AttributeError):
            pass  # authentication already over, or the client already gone

    def connection_requested(self, dest_host, dest_port, orig_host, orig_port) -> bool:
        return False  # local port forwarding

    def server_requested(self, listen_host, listen_port) -> bool:
        return False  # remote port forwarding

    def unix_connection_requested(self, dest_path):
        return False

    def unix_server_requested(self, listen_path):
        return False

    async def step(self, phase: str, body: dict) -> dict[str, Any]:
        return await self.bridge.gateway.call(self.link, self.connection.hosts[0].split(":")[0], phase, self.token,
                                              self.session, body)

    async def stream(self, phase: str, body: dict) -> Stream:
        """A stream step, withdrawn if the client goes away while it waits."""
        task = asyncio.ensure_future(self.bridge.gateway.stream(
            self.link, self.connection.hosts[0].split(":")[0], phase, self.token, self.session, body))
        self.waiting.add(task)
        try:
            return await task
        finally:
            self.waiting.discard(task)


class Bridge:
    """Listens for the ssh connections that share one address."""

    def __init__(self, address: tuple[str, int], connections: list[Connection], proxy: str, host_key: Path) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(proxy)
        self.address, self.connections = address, connections
        self.names = tuple(c.name for c in connections)
        self.gateway = Gateway((parts.hostname or "127.0.0.1", parts.port or 8080))
        self.host_key = host_key
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncssh.SSHAcceptor | None = None
        self.limits = connections[0].limits  # one listener, one set of limits (addons/engine/config.py)
        self.clients: set[Server] = set()

    def admit(self, server: Server) -> bool:
        """Count a new client connection, unless `limits.connections` are open already."""
        if len(self.clients) >= self.limits.connections:
            return False
        self.clients.add(server)
        return True

    def select(self, username: str) -> Connection | None:
        """`anything+name` is connection `name`; otherwise the only one on this address."""
        _, plus, name = username.rpartition("+")
        if plus:
            return next((c for c in self.connections if c.name == name), None)
        return self.connections[0] if len(self.connections) == 1 else None

    async def start(self) -> None:
        self.server = await asyncssh.create_server(
            lambda: Server(self), self.address[0], self.address[1], server_host_keys=[str(host_key(self.host_key))],
            process_factory=self._process, encoding=None, line_editor=False, agent_forwarding=False,
            x11_forwarding=False, allow_scp=False, sftp_factory=refuse_sftp,
            login_timeout=0)  # Server.login instead: asyncssh's counts the gateway's time too

    def close_later(self, server: Server) -> None:
        task = asyncio.ensure_future(self._close(server))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _close(self, server: Server) -> None:
        try:
            await server.step("close", {})
        except (Refused, LinkLost):
            pass  # the gateway closes idle sessions itself
        finally:
            server.link.close()

    async def _process(self, process: asyncssh.SSHServerProcess) -> None:
        server: Server = process.get_extra_info("connection").get_owner()
        server.link.attributes = attributes_from(dict(process.env or {}), "CUSTODY_")  # ssh -o SetEnv=CUSTODY_TASK=…
        try:
            if process.command is not None:
                with server.idle.busy():
                    await self._exec(server, process)
            else:
                await self._shell(server, process)
        except (ConnectionError, asyncssh.Error, asyncio.CancelledError):
            process.exit(255)
        except LinkLost as e:  # its gateway is gone: the session cannot go on elsewhere
            process.stderr.write(f"{e}\n".encode())
            process.exit(255)

    async def _exec(self, server: Server, process: asyncssh.SSHServerProcess) -> None:
        """One exec: its input read from the client at once (kept while the step waits for
        the gateway, which may hold it), sent once the stream opens, until EOF."""
        terminal = _terminal(process)
        out = Out(process, terminal is not None)
        keys = Keys(process, server.idle.touch)
        keys.start()
        try:
            stream = await server.stream("exec", {"command": process.command,
                                                  **({"terminal": terminal} if terminal else {})})
        except Refused as e:
            keys.stop()
            out.refusal(str(e))
            process.exit(REFUSED)
            return
        sending = asyncio.ensure_future(keys.to(stream))
        try:
            process.exit(await out.relay(stream))
        finally:
            sending.cancel()
            keys.stop()
            stream.close()

    async def _shell(self, server: Server, process: asyncssh.SSHServerProcess) -> None:
        terminal = process.get_terminal_type() is not None
        out = Out(process, terminal)
        keys = Keys(process, server.idle.touch) if terminal else None
        if keys is not None:
            keys.start()
        status = 0
        try:
            while True:
                out.raw(b"$ ")
                line = await (keys.line(out) if keys is not None else read_line(process))
                if line is None:
                    break
                server.idle.touch()
                if not line.strip():
                    continue
                with server.idle.busy():
                    try:
                        opening = asyncio.ensure_future(server.stream("shell", {"command": line}))
                        stream = await (keys.unless_interrupted(opening) if keys is not None else opening)
                    except Refused as e:
                        out.refusal(str(e))
                        status = REFUSED
                        continue
                    if stream is None:  # Ctrl-C while it waited: withdrawn
                        out.refusal("custody: withdrawn (Ctrl-C); the request was not sent")
                        status = 130
                        continue
                    interrupts = asyncio.ensure_future(keys.interrupts(stream)) if keys is not None else None
                    try:
                        status = await out.relay(stream)
                    finally:
                        if interrupts is not None:
                            interrupts.cancel()
                        stream.close()
                if out.ended:
                    break
        finally:
            if keys is not None:
                keys.stop()
        process.exit(status)


def refuse_sftp(channel: asyncssh.SSHServerChannel) -> asyncssh.SFTPServer:
    """asyncssh's sftp factory, so that the request is accepted and the client shows why it
    then ends: the reason on stderr, status 126."""
    channel.write_stderr((SFTP_REFUSED + "\n").encode())
    channel.exit(REFUSED)
    return asyncssh.SFTPServer(channel)


def _terminal(process: asyncssh.SSHServerProcess) -> dict | None:
    """The terminal the client asked for (ssh -t), as the stream step's body says it."""
    term = process.get_terminal_type()
    if term is None:
        return None
    cols, rows, _, _ = process.get_terminal_size()
    return {"term": term, "cols": cols or 80, "rows": rows or 24}


class Out:
    """What the client sees: output as it comes, refusals where its client shows them (a
    PTY session has one stream, the terminal, as a shell would; otherwise stderr)."""

    def __init__(self, process: asyncssh.SSHServerProcess, terminal: bool) -> None:
        self.process, self.terminal = process, terminal
        self.ended = False

    def raw(self, data: bytes) -> None:
        self.process.stdout.write(data)

    def refusal(self, message: str) -> None:
        if self.terminal:
            self.process.stdout.write(message.encode() + b"\r\n")
        else:
            self.process.stderr.write(message.encode() + b"\n")

    async def relay(self, stream: Stream) -> int:
        """Frames to the client until the stream's STATUS; the exit status."""
        while (frame := await stream.receive()) is not None:
            channel, data = frame
            if channel == STDOUT or (channel == STDERR and self.terminal):
                self.process.stdout.write(self._lines(data))
            elif channel == STDERR:
                self.process.stderr.write(data)
            elif channel == STATUS:
                doc = json.loads(data or b"{}")
                self.ended = bool(doc.get("ended"))
                if doc.get("error"):
                    self.refusal(doc["error"] + (f" (audit event: {doc['event_id']})" if doc.get("event_id") else ""))
                return int(doc.get("exit_status", 255))
        self.refusal("custody: the gateway ended the stream without an exit status")
        return 255

    def _lines(self, data: bytes) -> bytes:
        """A shell line's output on a terminal the bridge drives itself needs CR LF (an exec
        with a terminal gets the host's own)."""
        return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if self.terminal and self.process.command is None \
            else data


class Inbox:
    """A queue of the client's input that a reader can put back what it did not use."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[int, bytes]] = collections.deque()
        self.changed = asyncio.Event()

    def put(self, item: tuple[int, bytes]) -> None:
        self.items.append(item)
        self.changed.set()

    def put_back(self, items: list[tuple[int, bytes]]) -> None:
        self.items.extendleft(reversed(items))
        if items:
            self.changed.set()

    async def get(self) -> tuple[int, bytes]:
        while not self.items:
            self.changed.clear()
            await self.changed.wait()
        return self.items.popleft()


class Keys:
    """The client's input, read from the moment a command starts: kept while a step waits
    for the gateway, then sent to the stream; in a PTY session also the line editor's keys."""

    def __init__(self, process: asyncssh.SSHServerProcess, activity: Callable[[], None]) -> None:
        self.process = process
        self.activity = activity
        """Called for everything the client sends (the connection's idle time starts again)."""
        self.inbox = Inbox()
        self.reader: asyncio.Task | None = None

    def start(self) -> None:
        self.reader = asyncio.ensure_future(self._read())

    def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.process.stdin.read(65536)
            except asyncssh.TerminalSizeChanged as e:
                self.inbox.put((RESIZE, json.dumps({"cols": e.width, "rows": e.height}).encode()))
                continue
            except asyncssh.SignalReceived as e:
                self.inbox.put((SIGNAL, str(e.signal).encode()))
                continue
            except asyncssh.BreakReceived:
                self.inbox.put((SIGNAL, b"INT"))
                continue
            self.activity()
            self.inbox.put((STDIN, data))
            if not data:
                return

    async def to(self, stream: Stream) -> None:
        """Everything read, and everything to come, to the stream (EOF as an empty STDIN)."""
        while True:
            item = await self.inbox.get()
            await stream.send(*item)
            if item == (STDIN, b""):
                return

    async def line(self, out: Out) -> str | None:
        """One line, echoed and edited here. None at EOF (or Ctrl-D on an empty line)."""
        line = bytearray()
        while True:
            channel, data = await self.inbox.get()
            if channel != STDIN:
                continue
            if not data:
                return line.decode(errors="replace") if line else None
            for n, byte in enumerate(data):
                ch = bytes([byte])
                if ch in (b"\r", b"\n"):
                    out.raw(b"\r\n")
                    if data[n + 1:]:
                        self.inbox.put_back([(STDIN, data[n + 1:])])  # type-ahead stays for the next line
                    return line.decode(errors="replace")
                if ch in (b"\x7f", b"\x08"):
                    if line:
                        line.pop()
                        out.raw(b"\b \b")
                elif ch == b"\x03":
                    line.clear()
                    out.raw(b"^C\r\n$ ")
                elif ch == b"\x04" and not line:
                    return None
                elif ch >= b" ":
                    line += ch
                    out.raw(ch)

    async def unless_interrupted(self, opening: asyncio.Future) -> Stream | None:
        """The stream, or None if Ctrl-C comes first: the step is then withdrawn (its
        connection closed, so the gateway abandons the approval it waits for)."""
        kept: list[tuple[int, bytes]] = []
        try:
            while True:
                getting = asyncio.ensure_future(self.inbox.get())
                await asyncio.wait([opening, getting], return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return opening.result()
                item = getting.result()
                if item[0] == STDIN and b"\x03" in item[1]:
                    opening.cancel()
                    await asyncio.gather(opening, return_exceptions=True)
                    return None
                kept.append(item)
                if opening.done():
                    return opening.result()
        finally:
            self.inbox.put_back(kept)

    async def interrupts(self, stream: Stream) -> None:
        """Ctrl-C while a shell line runs interrupts it; other keys wait for the next line."""
        kept: list[tuple[int, bytes]] = []
        try:
            while True:
                channel, data = await self.inbox.get()
                if channel == STDIN and b"\x03" in data:
                    await stream.send(SIGNAL, b"INT")
                else:
                    kept.append((channel, data))
        finally:
            self.inbox.put_back(kept)


async def read_line(process: asyncssh.SSHServerProcess) -> str | None:
    """One line from a client without a terminal. None at EOF."""
    data = await process.stdin.readline()
    return data.decode(errors="replace").rstrip("\r\n") if data else None


def host_key(path: Path) -> Path:
    """The bridge's own host key: created once (0600), then kept, so clients can pin it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key())
    return path
