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

A session lives on one gateway replica (its backend connection is there), named by the
`x-custody-replica` header of the terminal's answers. A link that breaks once the session
is established may be opened again only to that replica (a keep-alive connection the
gateway closed while idle, or after an answer that closed it): the first answer on the new
connection must name it. Anything else, a break in the middle of a step or an answer from
another replica (behind a load balancer), ends the session: `LinkLost`, which the bridges
report as a fatal error (pg: SQLSTATE 08006; ssh: exit status 255).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from addons.engine.model import AGENT_ATTRIBUTES

SQL_RESULTS = "application/vnd.custody.sql-results+json"
"""pg_bridge results (pg_bridge/terminal/executor.py): masked by column, see Masker.sql_results."""
SSH_RESULTS = "application/vnd.custody.ssh-results+json"
"""ssh_bridge output (ssh_bridge/terminal/executor.py): stdout and stderr masked as text, line by line."""
IDLE = 3600.0
"""A terminal closes a bridge session idle for this long (a client that vanished without `close`)."""
SWEEP = 60.0
"""How often terminals look for idle sessions."""


@dataclass(frozen=True)
class Contract:
    """One bridge's requests: the session header, the phases by path, the answer's media type."""

    bridge: str
    session_header: str
    phases: dict[str, str]
    results: str

    def phase(self, method: str, path: str) -> str | None:
        return self.phases.get(path) if method.upper() == "POST" else None


POSTGRES = Contract("pg_bridge", "pg-bridge-session",
                    {"/connect": "connect", "/execute": "execute", "/describe": "describe", "/cancel": "cancel",
                     "/close": "close"}, SQL_RESULTS)
SSH = Contract("ssh_bridge", "ssh-bridge-session",
               {"/connect": "connect", "/exec": "exec", "/shell": "shell", "/close": "close"}, SSH_RESULTS)


class Unreachable(Exception):
    """The gateway could not be reached, or broke the connection mid-answer."""


class LinkLost(Unreachable):
    """The session's link to its gateway replica broke: the session has ended."""


LOST = ("custody: the link to the gateway broke; this session has ended and cannot continue on another gateway "
        "(reconnect to start a new one)")
REPLICA_HEADER = "x-custody-replica"
"""The gateway replica that answered a bridge step (addons/replica.py stamps it)."""


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
    return {f"x-custody-{name}": header_value(value) for name, value in attributes.items()
            if name in AGENT_ATTRIBUTES and value}


def header_value(value: str) -> str:
    return " ".join(str(value).split()).encode("ascii", "backslashreplace").decode()[:256]


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
        if self.lost:
            raise LinkLost(LOST)
        if self.writer is None or self.writer.is_closing() or self.reader.at_eof():
            self.close()  # closed, or closed by the gateway while idle: open it again, to the same replica
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.reopened = self.answered
        try:
            headers = {**headers, **attribute_headers(self.attributes)}
            head = f"POST {url} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            self.writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await self.reader.readuntil(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            fields: dict[str, str] = {}
            while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
                name, _, value = line.decode("latin-1").partition(":")
                fields[name.strip().lower()] = value.strip()
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


async def step(link: Link, contract: Contract, host: str, phase: str, token: str, session: str,
               body: dict) -> dict[str, Any]:
    """POST one step to `host` through the gateway; the terminal's JSON answer."""
    try:
        status, fields, content = await link.post(
            f"http://{host}/{phase}",
            {"host": host, "proxy-authorization": f"Bearer {token}", "content-type": "application/json",
             contract.session_header: session},
            json.dumps(body, ensure_ascii=False).encode())
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        raise Unreachable(f"custody: the gateway is unreachable or broke the connection: {e or type(e).__name__}") \
            from None
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    if status == 200 and fields.get("content-type", "").startswith(contract.results) and isinstance(doc, dict):
        return doc
    raise Refusal(status, doc)
