"""Server-sent events (the WHATWG event-stream format), event by event: what a stream hook
needs to read, change or drop each event of a `text/event-stream` response as it passes.

A record of an SSE stream is an event, not a line: an event's `data` may span lines, and an
event ends at a blank line. Lines end in CRLF, LF or CR; they are read as LF. `EventStream` cuts chunks into events (a partial event waits
for the rest), hands each to a handler, and sends what the handler returns in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


class StreamError(Exception):
    """An event that may not be sent (too long, or its handler failed): the stream ends."""


@dataclass
class Event:
    """One event: its fields in order (`comment` lines keep their text)."""

    fields: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: bytes) -> Event:
        out = cls()
        for line in raw.decode("utf-8").split("\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            out.fields.append((name, value[1:] if value.startswith(" ") else value) if sep else (name, ""))
        return out

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.fields if n == name]
        return "\n".join(values) if values else None

    @property
    def type(self) -> str:
        return self.get("event") or "message"

    @property
    def data(self) -> str | None:
        return self.get("data")

    def with_data(self, data: str) -> Event:
        """The same event (type, id, retry, comments) carrying `data` instead."""
        kept = [(n, v) for n, v in self.fields if n != "data"]
        at = next((i for i, (n, _) in enumerate(self.fields) if n == "data"), len(kept))
        lines = [("data", line) for line in data.split("\n")]
        return Event(kept[:at] + lines + kept[at:])

    def encode(self) -> bytes:
        return "".join(f"{n}: {v}\n" if n else f":{v}\n" for n, v in self.fields).encode() + b"\n"


class EventStream:
    """mitmproxy's stream hook for an event stream: `handle(event)` returns the bytes to
    send in the event's place (b"" drops it). An event longer than `max_event` raises
    StreamError; so does a handler that raises. What was sent is kept (up to `keep` bytes)
    for the audit log."""

    def __init__(self, handle: Callable[[Event], bytes], max_event: int, keep: int) -> None:
        self.handle, self.max_event, self.keep = handle, max_event, keep
        self.pending = b""
        self.sent = bytearray()
        self.size = 0

    def __call__(self, chunk: bytes) -> bytes:
        data = self.pending + chunk
        end = chunk == b""  # the end: an event without its blank line is incomplete, and dropped
        held = b"\r" if data.endswith(b"\r") and not end else b""  # maybe the first half of a CRLF
        data = (data[:-1] if held else data).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, rest = data.split(b"\n\n")
        out = bytearray()
        for raw in events:
            out += self._one(raw)
        self.pending = b"" if end else rest + held
        if len(self.pending) > self.max_event:
            raise StreamError(f"an event of the stream is longer than {self.max_event} bytes")
        return self.account(bytes(out))

    def _one(self, raw: bytes) -> bytes:
        if len(raw) > self.max_event:
            raise StreamError(f"an event of the stream is longer than {self.max_event} bytes")
        try:
            event = Event.parse(raw)
        except UnicodeDecodeError:
            raise StreamError("an event of the stream is not UTF-8 text") from None
        return self.handle(event) if event.fields else b""

    def account(self, out: bytes) -> bytes:
        """Count `out` as sent (and keep it for the record, up to `keep` bytes)."""
        self.size += len(out)
        if len(self.sent) < self.keep:
            self.sent += out[: self.keep - len(self.sent)]
        return out
