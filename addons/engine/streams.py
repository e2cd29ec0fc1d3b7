"""Masking a stream as it passes: record by record, never a record unmasked.

mitmproxy hands a streamed response to a hook chunk by chunk; `RecordStream` cuts the
chunks into lines and masks what a reader would take as one unit:

- server-sent events (text/event-stream): the whole event, up to its blank line. Its data
  lines are joined as the client joins them (so a JSON document or a PEM key split over
  several `data:` lines is seen whole), masked, and split again; `event` and `id` values
  are masked as text; comments keep their colon and lose their text; `retry` stays only
  when it is a number; any other field, which clients ignore, is dropped.
- JSON lines and text: line by line, except that a PEM private key is held from its BEGIN
  line to its END line and masked as one block.

A record (an event, a held key, a line) longer than `max_record`, a key that never ends,
or one that cannot be masked raises MaskError: the caller ends the stream there. What was
sent is kept (up to `keep` bytes) for the audit log, with the report.
"""

from __future__ import annotations

from addons.engine.masks import Masker, MaskError, Report

PEM_BEGIN, PEM_END = b"-----BEGIN ", b"-----END "
PEM_MARK = b"PRIVATE KEY-----"


class RecordStream:
    def __init__(self, masker: Masker, max_record: int, keep: int, events: bool = False) -> None:
        self.masker, self.max_record, self.keep, self.events = masker, max_record, keep, events
        self.pending = b""
        self.held: list[bytes] = []
        self.report = Report()
        self.sent = bytearray()
        self.size = 0

    def __call__(self, chunk: bytes) -> bytes:
        if not self.masker.masks:
            return self._sent(chunk)
        if chunk == b"":  # end of the stream: whatever is left is the last record
            last, self.pending = self.pending, b""
            out = self._line(last, b"") if last else b""
            return self._sent(out + self._end())
        data = self.pending + chunk
        *lines, self.pending = data.split(b"\n")
        if len(self.pending) > self.max_record:
            raise MaskError(f"a streamed record is longer than {self.max_record} bytes")
        return self._sent(b"".join(self._line(line, b"\n") for line in lines))

    def _line(self, line: bytes, newline: bytes) -> bytes:
        if len(line) > self.max_record:
            raise MaskError(f"a streamed record is longer than {self.max_record} bytes")
        if self.events:
            return self._event_line(line, newline)
        if self.held or (PEM_BEGIN in line and PEM_MARK in line and PEM_END not in line):
            self._hold(line)
            if not (PEM_END in line and PEM_MARK in line):
                return b""
            block, self.held = b"\n".join(self.held), []
            return _masked_text(self.masker, block, self.report) + newline
        return self.masker.record(line, self.report) + newline

    def _event_line(self, line: bytes, newline: bytes) -> bytes:
        if line.rstrip(b"\r"):
            self._hold(line)
            return b""
        event, self.held = self.held, []
        return mask_event(self.masker, event, self.report) + line + newline

    def _hold(self, line: bytes) -> None:
        self.held.append(line)
        if sum(map(len, self.held)) > self.max_record:
            raise MaskError(f"a streamed record is longer than {self.max_record} bytes")

    def _end(self) -> bytes:
        if not self.held:
            return b""
        if not self.events:
            raise MaskError("the stream ended inside a private key; it was not sent")
        event, self.held = self.held, []
        return mask_event(self.masker, event, self.report).rstrip(b"\n")


    def _sent(self, out: bytes) -> bytes:
        self.size += len(out)
        if len(self.sent) < self.keep:
            self.sent += out[: self.keep - len(self.sent)]
        return out


def mask_event(masker: Masker, lines: list[bytes], report: Report) -> bytes:
    """One server-sent event (its lines, without the blank line that ends it), masked:
    every field is masked or dropped (see the module's docstring)."""
    out: list[bytes] = []
    data: list[bytes] = []
    for raw in lines:
        line = raw.rstrip(b"\r")
        field, colon, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if colon and field == b"":
            out.append(b":")
        elif field == b"data":
            data.append(value)
        elif field in (b"event", b"id"):
            out.append(field + b": " + masker.text(_decoded(value), report, field.decode()).encode())
        elif field == b"retry" and value.isdigit():
            out.append(line)
    if data:
        out += [b"data: " + part for part in _masked_text(masker, b"\n".join(data), report).split(b"\n")]
    return b"".join(part + b"\n" for part in out)


def _masked_text(masker: Masker, value: bytes, report: Report) -> bytes:
    masked = masker.record_text(_decoded(value), report)
    return value if masked is None else masked.encode()


def _decoded(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MaskError("a streamed record is not text and cannot be masked") from None
