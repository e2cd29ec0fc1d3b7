"""The bridge contract: what pg_bridge and ssh_bridge agree on with the gateway.

A bridge turns each client step into one HTTP request through the gateway's proxy port,
under the agent's own token: `POST http://<connection host>/<phase>` with a JSON body and
the bridge session in a header. Its terminal (pg_bridge/terminal, ssh_bridge/terminal)
answers with a JSON document of the bridge's result media type; the classifiers read the
same phases and header. Both bridges import this module; neither imports the other.

Each bridge session keeps one raw keep-alive HTTP/1.1 connection (`Link`): a session's
steps are sequential, so it needs no pool, and a plain-HTTP request to a proxy is just the
request line in absolute form plus Proxy-Authorization. `step()` returns the terminal's
answer; anything else — the gateway unreachable, or a refusal with its JSON reason — is
an exception the bridge turns into its own protocol's error.

A contract's `streams` are phases whose input and output flow while the command runs (an
SSH exec, a shell line). Such a step is the same POST, asking to upgrade to a WebSocket on
a connection of its own (`Stream`): the gateway identifies, classifies, decides, holds and
records the request as for any step, and answers 101 only once it is cleared. From then on
every frame passes the chain's WebSocket hooks, as Kubernetes exec frames do: output is
masked record by record and every frame, input included, is recorded. Frames are binary,
their first byte a channel (as Kubernetes' channel.k8s.io): STDIN (an empty one is end of
input), STDOUT, STDERR, STATUS (the last frame: JSON with the exit status, or an error and
its audit event), RESIZE (JSON cols and rows) and SIGNAL (a signal name, e.g. INT).

A session lives on one gateway replica (its backend connection is there), named by the
`x-custody-replica` header of the terminal's answers. A link that breaks once the session
is established may be opened again only to that replica (a keep-alive connection the
gateway closed while idle, or after an answer that closed it): the first answer on the new
connection must name it. Every step names the session's replica (`x-custody-replica`), and
another replica refuses it at once with 421 `wrong_replica`, before anything runs: behind a
load balancer, the bridge then opens another connection, which the balancer may send
elsewhere, up to REPLICA_TRIES times. Anything else, a break in the middle of a step or an
answer from another replica, ends the session: `LinkLost`, which the bridges report as a
fatal error (pg: SQLSTATE 08006; ssh: exit status 255).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping

from addons.engine.errors import Error
from addons.engine.model import AGENT_ATTRIBUTES, MAX_ATTRIBUTE, attribute_limit
from addons.engine.tokens import well_formed

SQL_REQUEST = "application/vnd.custody.sql-request+json"
"""pg_bridge requests ({"sql": …, "params": […]}): masked for the record as SQL text (Masker.sql_request)."""
SQL_RESULTS = "application/vnd.custody.sql-results+json"
"""pg_bridge results (pg_bridge/terminal/executor.py): masked by column, see Masker.sql_results."""
SSH_RESULTS = "application/vnd.custody.ssh-results+json"
"""ssh_bridge output (ssh_bridge/terminal/executor.py): stdout and stderr masked as text, line by line."""
IDLE = 3600.0
"""A terminal closes a bridge session idle for this long (a client that vanished without `close`)."""
SWEEP = 60.0
"""How often terminals look for idle sessions."""
STDIN, STDOUT, STDERR, STATUS, RESIZE, SIGNAL = 0, 1, 2, 3, 4, 5
"""The channels of a stream's frames (their first byte)."""
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: str) -> str:
    """The Sec-WebSocket-Accept answer to a Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest()).decode()


@dataclass(frozen=True)
class Contract:
    """One bridge's requests: the session header, the phases by path, the answer's media type,
    the requests' media type (JSON either way; its name tells the masker what it holds)."""

    bridge: str
    session_header: str
    phases: dict[str, str]
    results: str
    streams: frozenset[str] = field(default=frozenset())
    requests: str = "application/json"

    def phase(self, method: str, path: str) -> str | None:
        return self.phases.get(path) if method.upper() == "POST" else None


POSTGRES = Contract("pg_bridge", "pg-bridge-session",
                    {"/connect": "connect", "/execute": "execute", "/describe": "describe", "/cancel": "cancel",
                     "/close": "close"}, SQL_RESULTS, requests=SQL_REQUEST)
SSH = Contract("ssh_bridge", "ssh-bridge-session",
               {"/connect": "connect", "/exec": "exec", "/shell": "shell", "/close": "close"}, SSH_RESULTS,
               streams=frozenset({"exec", "shell"}))


class Unreachable(Exception):
    """The gateway could not be reached, or broke the connection mid-answer."""


class LinkLost(Unreachable):
    """The session's link to its gateway replica broke: the session has ended."""


LOST = ("custody: the link to the gateway broke; this session has ended and cannot continue on another gateway "
        "(reconnect to start a new one)")
REPLICA_HEADER = "x-custody-replica"
"""The gateway replica that answered a bridge step (addons/replica.py stamps it), and the one
a step is for (a bridge sends it once it knows; another replica refuses the step)."""
REPLICA_TRIES = 16
"""New connections a step may open to find its session's replica behind a balancer."""


class Refusal(Exception):
    """The gateway answered with a refusal (or something that is not the terminal's answer)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"refused with {status}")
        self.status, self.body = status, body if isinstance(body, dict) else None

    @property
    def identity(self) -> bool:
        return self.status in (401, 407)

    @property
    def reason(self) -> str:
        if self.body is None:
            return f"custody: the gateway answered {self.status} without a reason"
        return f"custody: {self.body.get('reason', 'refused')}"

    @property
    def detail(self) -> str:
        """The rules, the approval and the audit event the refusal names."""
        b = self.body or {}
        parts = []
        if b.get("rules"):
            parts.append(f"rules: {', '.join(b['rules'])}")
        if b.get("approval_id"):
            parts.append(f"approval: {b['approval_id']}" + (f" ({b['state']})" if b.get("state") else ""))
        if b.get("event_id"):
            parts.append(f"audit event: {b['event_id']}")
        return "; ".join(parts)


def attribute_headers(attributes: dict[str, str]) -> dict[str, str]:
    """X-Custody-* headers for the agent attributes; values are made single-line ASCII-safe."""
    return {f"x-custody-{name}": header_value(value, attribute_limit(name)) for name, value in attributes.items()
            if name in AGENT_ATTRIBUTES and value}


def header_value(value: str, limit: int = MAX_ATTRIBUTE) -> str:
    return " ".join(str(value).split()).encode("ascii", "backslashreplace").decode()[:limit]


def attributes_from(pairs: dict[str, str], prefix: str) -> dict[str, str]:
    """Agent attributes from names like CUSTODY_TASK (ssh env) or custody.task (pg options)."""
    out = {}
    for key, value in pairs.items():
        name = key[len(prefix):].lower() if key.lower().startswith(prefix.lower()) else ""
        if name in AGENT_ATTRIBUTES:
            out[name] = value
    return out


class Link:
    """One keep-alive HTTP/1.1 connection to the gateway's proxy port. A session's steps
    are sequential, so each session has its own link and needs no pool; a plain-HTTP
    request to a proxy is the request line in absolute form plus Proxy-Authorization."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.attributes: dict[str, str] = {}
        """What the agent says about itself (agent, model, run, task, prompt), sent as the
        X-Custody-* headers of every step: recorded by the gateway as asserted."""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.replica: str | None = None
        """The gateway replica the session lives on (its first answer names it)."""
        self.answered = False
        self.reopened = False
        self.lost = False

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        for _ in range(REPLICA_TRIES):
            answer = await self._post(url, headers, body)
            if answer is not None:
                return answer
        self.lost = True
        raise LinkLost(LOST)

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """One exchange; None when it reached another replica than the session's (nothing ran)."""
        if self.lost:
            raise LinkLost(LOST)
        if self.writer is None or self.writer.is_closing() or self.reader.at_eof():
            self.close()  # closed, or closed by the gateway while idle: open it again, to the same replica
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.reopened = self.answered
        try:
            headers = {**headers, **attribute_headers(self.attributes)}
            if self.replica is not None:
                headers[REPLICA_HEADER] = self.replica
            head = f"POST {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            self.writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status, fields = await read_head(self.reader)
            if status == 101:
                return status, fields, b""
            if fields.get("transfer-encoding", "").lower() == "chunked":
                content = bytearray()
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    content += await self.reader.readexactly(size + 2)
                    del content[-2:]
                await self.reader.readuntil(b"\r\n")
            else:
                content = await self.reader.readexactly(int(fields.get("content-length", "0")))
            if fields.get("connection", "").lower() == "close":
                self.close()
        except BaseException as e:
            self.close()  # a half-read answer leaves the connection unusable
            if self.answered and isinstance(e, (OSError, asyncio.IncompleteReadError)):
                self.lost = True  # the step's outcome is unknown, and the session cannot go on
                raise LinkLost(LOST) from None
            raise
        if status == 421 and self.replica is not None and _error(content) == Error.WRONG_REPLICA:
            self.close()
            return None
        replica = fields.get(REPLICA_HEADER)
        if self.reopened and replica != self.replica:  # a connection opened again reached another replica
            self.close()
            self.lost = True
            raise LinkLost(LOST)
        self.replica = self.replica or replica  # (a refusal made late in the gateway may not name it)
        self.answered, self.reopened = True, False
        return status, fields, bytes(content)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """An HTTP/1.1 status line and header fields (names lower-cased)."""
    status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
    return status, await read_fields(reader)


async def read_fields(reader: asyncio.StreamReader) -> dict[str, str]:
    """HTTP/1.1 header fields up to the empty line (names lower-cased)."""
    fields: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def _request(contract: Contract, host: str, token: str, session: str) -> dict[str, str]:
    """A step's headers. The token is the client's password, as it typed it: one that is
    not shaped as a JWT is refused here, as the gateway would refuse it, since in the
    header it could end the line and write the rest of the request head itself."""
    if not well_formed(token):
        raise Refusal(407, {"decision": "deny", "error": Error.UNAUTHENTICATED, "reason": "malformed token"})
    return {"host": host, "proxy-authorization": f"Bearer {token}", "content-type": contract.requests,
            contract.session_header: session}


def _error(content: bytes) -> str | None:
    """The error code of a JSON refusal, if it is one."""
    try:
        doc = json.loads(content)
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def _refusal(status: int, fields: dict[str, str], content: bytes, contract: Contract) -> dict[str, Any]:
    """The terminal's JSON answer, or the Refusal the gateway's answer is."""
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    if status == 200 and fields.get("content-type", "").startswith(contract.results) and isinstance(doc, dict):
        return doc
    raise Refusal(status, doc)


UNREACHABLE = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError)


def _unreachable(e: BaseException) -> Unreachable:
    return Unreachable(f"custody: the gateway is unreachable or broke the connection: {e or type(e).__name__}")


async def step(link: Link, contract: Contract, host: str, phase: str, token: str, session: str,
               body: dict) -> dict[str, Any]:
    """POST one step to `host` through the gateway; the terminal's JSON answer."""
    try:
        status, fields, content = await link.post(f"http://{host}/{phase}", _request(contract, host, token, session),
                                                  json.dumps(body, ensure_ascii=False).encode())
    except UNREACHABLE as e:
        raise _unreachable(e) from None
    return _refusal(status, fields, content, contract)


class Frames:
    """The frames of a stream over one WebSocket, either end: (channel, bytes) each way;
    `receive()` returns None once the stream has ended."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, end: ConnectionType) -> None:
        self.reader, self.writer, self.ws = reader, writer, Connection(end)
        self.pending: list[tuple[int, bytes]] = []
        self.partial = bytearray()
        self.ended = False

    async def send(self, channel: int, data: bytes = b"") -> None:
        if self.writer.is_closing():
            raise ConnectionError("the stream is closed")
        self.writer.write(self.ws.send(BytesMessage(data=bytes([channel]) + data)))
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes] | None:
        while not self.pending:
            if self.ended:
                return None
            try:
                data = await self.reader.read(65536)
            except OSError:
                data = b""
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, Message):
                    self.partial += event.data if isinstance(event.data, bytes) else event.data.encode()
                    if event.message_finished and self.partial:
                        self.pending.append((self.partial[0], bytes(self.partial[1:])))
                        self.partial = bytearray()
                elif isinstance(event, Ping):
                    self.writer.write(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.ended = True
            if not data:
                self.ended = True
        return self.pending.pop(0)

    def close(self) -> None:
        self.ended = True
        self.writer.close()


class Stream(Frames):
    """A stream step, the bridge's end: the WebSocket one step upgrades to, on a connection
    of its own. `open()` returns once the gateway cleared the step (after any hold for
    approval); a refusal raises Refusal and an unreachable gateway Unreachable, as `step()`
    does, and reaching a replica other than the session's raises LinkLost."""

    @classmethod
    async def open(cls, link: Link, contract: Contract, host: str, phase: str, token: str, session: str,
                   body: dict) -> Stream:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        upgrade = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                   "sec-websocket-key": key}
        own = Link(link.host, link.port)
        own.attributes, own.replica, own.answered = link.attributes, link.replica, link.answered  # same replica
        try:
            status, fields, content = await own.post(
                f"http://{host}/{phase}", {**_request(contract, host, token, session), **upgrade},
                json.dumps(body, ensure_ascii=False).encode())
        except UNREACHABLE as e:
            raise _unreachable(e) from None
        except BaseException:
            own.close()  # cancelled while held: the gateway sees the client go (the approval is abandoned)
            raise
        if status != 101:
            own.close()
            raise Refusal(status, _refusal(status, fields, content, contract))  # the terminal answered: an error
        if fields.get("sec-websocket-accept") != websocket_accept(key):
            own.close()
            raise Unreachable("custody: the gateway's WebSocket answer does not match the request")
        return cls(own.reader, own.writer, ConnectionType.CLIENT)
