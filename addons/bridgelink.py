"""How the bridges (pg_bridge, ssh_bridge) reach the gateway: one HTTP request per client
step, through the gateway's proxy port, under the agent's own token.

Each bridge session keeps one raw keep-alive HTTP/1.1 connection (`Link`): a session's
steps are sequential, so it needs no pool, and a plain-HTTP request to a proxy is just the
request line in absolute form plus Proxy-Authorization. `step()` returns the terminal's
answer; anything else — the gateway unreachable, or a refusal with its JSON reason — is
an exception the bridge turns into its own protocol's error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from addons.devissuer import AGENT_ATTRIBUTES


class Unreachable(Exception):
    """The gateway could not be reached, or broke the connection mid-answer."""


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

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
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
            return status, fields, bytes(content)
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def step(link: Link, host: str, phase: str, token: str, session_header: str, session: str,
               body: dict, answer_type: str) -> dict[str, Any]:
    """POST one step to `host` through the gateway; the terminal's JSON answer."""
    try:
        status, fields, content = await link.post(
            f"http://{host}/{phase}",
            {"host": host, "proxy-authorization": f"Bearer {token}", "content-type": "application/json",
             session_header: session},
            json.dumps(body, ensure_ascii=False).encode())
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        raise Unreachable(f"custody: the gateway is unreachable or broke the connection: {e or type(e).__name__}") \
            from None
    try:
        doc = json.loads(content)
    except ValueError:
        doc = None
    if status == 200 and fields.get("content-type", "").startswith(answer_type) and isinstance(doc, dict):
        return doc
    raise Refusal(status, doc)
