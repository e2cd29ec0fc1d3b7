"""ssh_bridge: an SSH server for unmodified clients, whose every command is an HTTP request
through the gateway.

An agent logs in with its OIDC JWT as the password (or the answer to a keyboard-interactive
prompt); the bridge asks the gateway to open a session (`POST /connect` to the connection's
host, the token as Proxy-Authorization) and accepts the login only if the gateway does.
The user name selects the connection: `anything+prod-web` is connection `prod-web`; with
one ssh connection on a listen address, any user name means that one.

- An `exec` request is one `POST /exec`: the command, and its standard input up to EOF
  (at most STDIN_LIMIT bytes). Input must start within STDIN_FIRST (a pipe, or `ssh -n`
  for none): a client that neither sends input nor closes it is not waited on.
  Its stdout, stderr and exit status come back byte for byte.
- A shell (with or without a PTY) is read line by line; each line is one `POST /shell`,
  run in the session's one persistent shell on the host, so `cd` and variables persist.
  With a PTY the bridge echoes and edits the line itself (backspace, Ctrl-C, Ctrl-D).
- Port forwarding, agent forwarding, X11 and subsystems (sftp) are refused.

A refused command prints `custody: <reason>` on stderr and exits with status 126; a session
whose link to its gateway broke prints why and exits with status 255.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import asyncssh

from addons.engine.bridge import SSH, Link, LinkLost, Refusal, Unreachable, attributes_from, step
from addons.engine.config import Connection

logger = logging.getLogger(__name__)
STDIN_LIMIT = 1 << 20
STDIN_FIRST = 0.05
STDIN_WAIT = 10.0
REFUSED = 126


class Refused(Exception):
    """The gateway (or the host) said no; the message is for the agent."""


class Gateway:
    """The bridge's requests, through the gateway's proxy port, to a connection's host."""

    def __init__(self, proxy: tuple[str, int]) -> None:
        self.proxy = proxy

    async def call(self, link: Link, host: str, phase: str, token: str, session: str, body: dict) -> dict[str, Any]:
        try:
            doc = await step(link, SSH, host, phase, token, session, body)
        except LinkLost:
            raise  # the session is over (Bridge._process)
        except Unreachable as e:
            raise Refused(str(e)) from None
        except Refusal as e:
            raise Refused(e.reason + (f" ({e.detail})" if e.detail else "")) from None
        if doc.get("error"):
            raise Refused(doc["error"])
        return doc


def output(doc: dict[str, Any], stream: str) -> bytes:
    value = doc.get(stream, "")
    return base64.b64decode(value) if doc.get("encoding") == "base64" else value.encode()


class Server(asyncssh.SSHServer):
    """One client connection: authentication through the gateway, forwarding refused."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.session = secrets.token_hex(16)
        self.token = ""
        self.connection: Connection | None = None
        self.link = Link(*bridge.gateway.proxy)

    def connection_lost(self, exc: Exception | None) -> None:
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
        if connection is None or not password:
            return False
        try:
            await self.bridge.gateway.call(self.link, connection.hosts[0].split(":")[0], "connect", password.strip(),
                                           self.session, {"user": username})
        except Refused as e:
            logger.info("ssh_bridge: login refused for %s: %s", username, e)
            return False
        self.token, self.connection = password.strip(), connection
        return True

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
            x11_forwarding=False, allow_scp=False, sftp_factory=None)

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
            if process.subsystem:
                process.stderr.write(f"custody: subsystem {process.subsystem!r} is not allowed\n".encode())
                process.exit(REFUSED)
            elif process.command is not None:
                await self._exec(server, process)
            else:
                await self._shell(server, process)
        except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, ConnectionError):
            process.exit(255)
        except LinkLost as e:  # its gateway is gone: the session cannot go on elsewhere
            process.stderr.write(f"{e}\n".encode())
            process.exit(255)

    async def _exec(self, server: Server, process: asyncssh.SSHServerProcess) -> None:
        stdin = bytearray()
        wait = STDIN_FIRST  # a client that sends nothing (and no EOF) is not waited on long
        try:
            while len(stdin) <= STDIN_LIMIT:
                chunk = await asyncio.wait_for(process.stdin.read(65536), wait)
                if not chunk:
                    break
                stdin += chunk
                wait = STDIN_WAIT  # input has started: read it to EOF
        except TimeoutError:
            pass  # no (more) input: the command runs with what arrived
        try:
            doc = await server.step("exec", {"command": process.command,
                                             "stdin": base64.b64encode(bytes(stdin[:STDIN_LIMIT])).decode()})
        except Refused as e:
            process.stderr.write(f"{e}\n".encode())
            process.exit(REFUSED)
            return
        process.stdout.write(output(doc, "stdout"))
        process.stderr.write(output(doc, "stderr"))
        process.exit(int(doc.get("exit_status", 255)))

    async def _shell(self, server: Server, process: asyncssh.SSHServerProcess) -> None:
        terminal = process.get_terminal_type() is not None
        newline = b"\r\n" if terminal else b"\n"
        status = 0
        while True:
            process.stdout.write(b"$ ")
            line = await read_line(process, echo=terminal)
            if line is None:
                break
            if not line.strip():
                continue
            try:
                doc = await server.step("shell", {"command": line})
            except Refused as e:
                process.stderr.write(f"{e}".encode() + newline)
                status = REFUSED
                continue
            for stream, target in (("stdout", process.stdout), ("stderr", process.stderr)):
                data = output(doc, stream)
                target.write(data.replace(b"\n", newline) if terminal else data)
            status = int(doc.get("exit_status", 0))
            if doc.get("ended"):
                break
        process.exit(status)


async def read_line(process: asyncssh.SSHServerProcess, *, echo: bool) -> str | None:
    """One line from the client; with a terminal, echoed and edited here. None at EOF."""
    line = bytearray()
    while True:
        data = await (process.stdin.read(1) if echo else process.stdin.readline())
        if not data:
            return line.decode(errors="replace") if line else None
        if not echo:
            return data.decode(errors="replace").rstrip("\r\n")
        if data in (b"\r", b"\n"):
            process.stdout.write(b"\r\n")
            return line.decode(errors="replace")
        if data in (b"\x7f", b"\x08"):
            if line:
                line.pop()
                process.stdout.write(b"\b \b")
        elif data == b"\x03":
            line.clear()
            process.stdout.write(b"^C\r\n$ ")
        elif data == b"\x04" and not line:
            return None
        elif data >= b" ":
            line += data
            process.stdout.write(data)


def host_key(path: Path) -> Path:
    """The bridge's own host key: created once (0600), then kept, so clients can pin it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key())
    return path
