"""The PostgreSQL v3 wire protocol, the server side: pure encode/decode functions.

Written by hand rather than with a codec library: the protocol is small and stable
(https://www.postgresql.org/docs/current/protocol-message-formats.html), the only
library (pygwire) is young with one maintainer, and real clients (psql, psycopg,
SQLAlchemy) in the tests are the judge of it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3_0 = 196608
MAX_MESSAGE = 256 * 1024 * 1024


class ProtocolError(Exception):
    """The client broke the protocol; the connection is closed after an error (08P01)."""


@dataclass
class Startup:
    code: int
    parameters: dict[str, str] = field(default_factory=dict)
    cancel: tuple[int, int] | None = None

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def parse_startup(body: bytes) -> Startup:
    """A startup packet's body (after its length): a request code, or a version and
    NUL-terminated name/value pairs."""
    if len(body) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = struct.unpack("!I", body[:4])
    if code == CANCEL_REQUEST:
        if len(body) < 12:
            raise ProtocolError("cancel request too short")
        pid, secret = struct.unpack("!II", body[4:12])
        return Startup(code, cancel=(pid, secret))
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        return Startup(code)
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: the server supports 3.0")
    items = body[4:].split(b"\0")
    params = {}
    for i in range(0, len(items) - 1, 2):
        if not items[i]:
            break
        params[items[i].decode("utf-8", "replace")] = items[i + 1].decode("utf-8", "replace")
    return Startup(code, params)


class Reader:
    """Reads fields from one message body."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def int16(self) -> int:
        return self._unpack("!h", 2)

    def int32(self) -> int:
        return self._unpack("!i", 4)

    def _unpack(self, fmt: str, n: int) -> int:
        if self.pos + n > len(self.data):
            raise ProtocolError("message too short")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        value = self.data[self.pos:end].decode("utf-8")
        self.pos = end + 1
        return value

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message too short")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def byte(self) -> str:
        return self.bytes(1).decode()


@dataclass
class Parse:
    name: str
    sql: str
    types: list[int]


@dataclass
class Bind:
    portal: str
    statement: str
    formats: list[int]
    params: list[bytes | None]
    result_formats: list[int]


@dataclass
class Describe:
    kind: str  # S or P
    name: str


@dataclass
class Execute:
    portal: str
    max_rows: int


@dataclass
class Close:
    kind: str
    name: str


def decode(kind: str, body: bytes):
    """A frontend message of the extended query protocol as a small typed object."""
    r = Reader(body)
    if kind == "P":
        name, sql = r.string(), r.string()
        return Parse(name, sql, [r.int32() for _ in range(r.int16())])
    if kind == "B":
        portal, statement = r.string(), r.string()
        formats = [r.int16() for _ in range(r.int16())]
        params = []
        for _ in range(r.int16()):
            n = r.int32()
            params.append(None if n == -1 else r.bytes(n))
        return Bind(portal, statement, formats, params, [r.int16() for _ in range(r.int16())])
    if kind == "D":
        return Describe(r.byte(), r.string())
    if kind == "E":
        return Execute(r.string(), r.int32())
    if kind == "C":
        return Close(r.byte(), r.string())
    if kind == "Q":
        return r.string()
    if kind == "p":
        return r.data.rstrip(b"\0").decode("utf-8", "replace")
    return body


def formats_for(formats: list[int], n: int) -> list[int]:
    """A format-code list as the protocol means it: none = all text, one = all of that one."""
    if not formats:
        return [0] * n
    if len(formats) == 1:
        return formats * n
    if len(formats) != n:
        raise ProtocolError(f"{len(formats)} format codes for {n} values")
    return formats


# backend messages

def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def cstring(value: str) -> bytes:
    return value.encode() + b"\0"


def auth_request(code: int) -> bytes:
    return message(b"R", struct.pack("!I", code))


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!II", pid, secret))


def ready(status: str) -> bytes:
    return message(b"Z", status.encode())


def negotiate_version(minor: int, unsupported: list[str]) -> bytes:
    return message(b"v", struct.pack("!II", minor, len(unsupported)) + b"".join(cstring(o) for o in unsupported))


def row_description(columns: list[dict], formats: list[int] | None = None) -> bytes:
    formats = formats_for(formats or [], len(columns))
    body = struct.pack("!h", len(columns))
    for c, fmt in zip(columns, formats):
        body += cstring(c["name"]) + struct.pack("!ihihih", c.get("table_oid", 0), c.get("column", 0), c["type_oid"],
                                                 c.get("type_size", -1), c.get("type_modifier", -1), fmt)
    return message(b"T", body)


def data_row(cells: list[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(cells))]
    for cell in cells:
        parts.append(b"\xff\xff\xff\xff" if cell is None else struct.pack("!i", len(cell)) + cell)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def parameter_description(oids: list[int]) -> bytes:
    return message(b"t", struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids))


def error(fields: dict[str, str], kind: bytes = b"E") -> bytes:
    """ErrorResponse (or NoticeResponse with kind N) from protocol fields."""
    body = b"".join(code.encode() + cstring(value) for code, value in fields.items() if len(code) == 1)
    return message(kind, body + b"\0")


PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
PORTAL_SUSPENDED = message(b"s")
EMPTY_QUERY = message(b"I")
SSL_NO = b"N"
SSL_YES = b"S"
