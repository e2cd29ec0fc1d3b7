"""Result formats: every column in the format the client asked for it in Bind.

libpq asks the server for one format for all columns of a result, and masking reads text.
So when masks apply, or a client asks for text in some columns and binary in others (JDBC
after prepareThreshold, asyncpg, pgx), the terminal fetches text and, once the result is
masked, encodes each column the client wants in binary: here for the types whose binary
form follows from their text alone (integers, floats, booleans, text, UUIDs, bytea), and
by the session's own server for every other type (dates and times depend on the session's
DateStyle and TimeZone; arrays, ranges, composites, numeric), which reads each value with
the type's input function and sends it with its binary send function: the client gets the
bytes it would have had from the server directly.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable

TEXT_LIKE = frozenset({25, 1043, 1042, 19, 18, 114, 142, 705})
"""text, varchar, bpchar, name, char, json, xml, unknown: binary is the UTF-8 text."""


class FormatError(Exception):
    """The client's result formats do not fit the result (error fields in `fields`)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", ""))
        self.fields = fields


def per_column(formats: list[int], n: int) -> list[int]:
    """Bind's result format codes for `n` columns, as the protocol reads them: none = all
    text, one = all of that one, else one per column."""
    if not formats:
        return [0] * n
    if len(formats) == 1:
        return formats * n
    if len(formats) != n:
        raise FormatError({"S": "ERROR", "V": "ERROR", "C": "08P01",
                           "M": f"bind message has {len(formats)} result formats but query has {n} columns"})
    return list(formats)


def fetched(formats: list[int], masked: bool) -> int:
    """The one format to ask the server for: the client's, when it is one format for every
    column and nothing is masked; else text."""
    return formats[0] if not masked and len(set(formats)) == 1 and formats[0] in (0, 1) else 0


def _bool(text: str) -> bytes:
    return b"\x01" if text == "t" else b"\x00"


def _bytea(text: str) -> bytes | None:
    return bytes.fromhex(text[2:]) if text.startswith("\\x") else None  # escape format: the server's


LOCAL: dict[int, Callable[[str], bytes | None]] = {
    16: _bool,
    21: lambda t: struct.pack("!h", int(t)),
    23: lambda t: struct.pack("!i", int(t)),
    20: lambda t: struct.pack("!q", int(t)),
    26: lambda t: struct.pack("!I", int(t)),
    700: lambda t: struct.pack("!f", float(t)),
    701: lambda t: struct.pack("!d", float(t)),
    2950: lambda t: bytes.fromhex(t.replace("-", "")),
    17: _bytea,
    3802: lambda t: b"\x01" + t.encode(),
    **{oid: (lambda t: t.encode()) for oid in TEXT_LIKE},
}


async def encode(doc: dict, server: Callable) -> None:
    """Encode, in place, the text cells of every column the client wants in binary.
    `server(oids, texts)` returns the server's binary forms (for what LOCAL cannot do)."""
    for result in doc.get("results", []):
        columns, rows = result.get("columns", ()), result.get("rows", [])
        wanted = [i for i, c in enumerate(columns) if c.get("send", c["format"]) == 1 and c["format"] == 0]
        remote: list[tuple[int, int]] = []
        for i in wanted:
            encoder = LOCAL.get(columns[i]["type_oid"])
            for r, row in enumerate(rows):
                if row[i] is None:
                    continue
                raw = encoder(row[i]) if encoder else None
                if raw is None:
                    remote.append((r, i))
                else:
                    row[i] = base64.b64encode(raw).decode()
        if remote:
            values = await server([columns[i]["type_oid"] for _, i in remote], [rows[r][i] for r, i in remote])
            for (r, i), raw in zip(remote, values):
                rows[r][i] = base64.b64encode(raw).decode()
        for i in wanted:
            columns[i]["format"] = 1
        for c in columns:
            c.pop("send", None)
