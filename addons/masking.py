"""masking: responses are masked in transit, as the decision's masks say, or refused.

- Ordinary bodies are buffered and masked in the worker processes (addons/maskpool.py).
- Streams (server-sent events, JSON lines, Kubernetes `watch` and `follow`) are masked
  record by record as they pass, through mitmproxy's stream hook (addons/engine/streams.py
  RecordStream), in this process: records are small, and a stream cannot wait for a pool.
  A masked stream changes length, so its Content-Length goes and an HTTP/1.1 client gets
  it chunked (an HTTP/1.0 client, until the connection closes): the next response on a
  kept-alive connection starts where this one really ends.
- Response headers are masked in this process as their headers arrive (detection on the
  values, credential headers and `keys` names whole), so what the agent and the recorder
  see is masked.
- A body too large to mask, or of a type that cannot be masked (binary), is refused as
  soon as its headers arrive: the upstream's bytes are drained and dropped, and the agent
  gets a 502 with a JSON reason.
- If masking raises, times out or is not ready, the agent gets a 502 with a JSON reason
  and no body; a stream that fails part-way is cut off, never continued unmasked.

The report (what was masked, by mask and entity, never the values) goes on the context for
the recorder, which stores only masked bodies.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from mitmproxy import http

from addons import context, failclosed
from addons.engine.bridge import STATUS, STDERR, STDOUT
from addons.engine.errors import Error
from addons.engine.masks import Masker, MaskError, Report, charset_of, parse_all
from addons.engine.streams import RecordStream
from addons.failclosed import guarded
from addons.maskpool import MaskPool, MaskUnavailable
from addons.settings import Settings

logger = logging.getLogger(__name__)

STREAM_TYPES = ("text/event-stream", "application/x-ndjson", "application/jsonl", "application/json-seq",
                "application/stream+json")
BINARY_TYPES = ("image/", "audio/", "video/", "application/octet-stream", "application/zip", "application/pdf",
                "application/gzip", "application/x-tar", "application/vnd.")


def is_stream(f: http.HTTPFlow) -> bool:
    content_type = f.response.headers.get("content-type", "").lower()
    if content_type.startswith(STREAM_TYPES):
        return True
    op = context.of(f).operation
    if op is not None and op.protocol == "kubernetes":
        return op.details.get("stream", False)  # watch (by query or path) and logs -f
    if "?" not in f.request.path:
        return False  # no query to parse (every response asks, masked or not)
    query = f.request.query
    return query.get("watch", "") in ("true", "1") or query.get("follow", "") in ("true", "1")


def is_watch(f: http.HTTPFlow) -> bool:
    op = context.of(f).operation
    return op is not None and op.protocol == "kubernetes" and op.details.get("verb") == "watch"


def error_record(f: http.HTTPFlow, reason: str) -> bytes:
    """The last record of a stream that was cut off, in the stream's own format: a
    Kubernetes watch gets an ERROR event with a Status (kubectl prints it), SSE an event,
    JSON lines an object, text a line."""
    content_type = f.response.headers.get("content-type", "").lower()
    if is_watch(f):
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                  "code": 502, "message": f"custody: {reason}"}
        return json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"
    document = json.dumps({"error": Error.MASKING_REFUSED, "reason": reason}).encode()
    if content_type.startswith("text/event-stream"):
        return b"event: custody-error\ndata: " + document + b"\n\n"
    if "json" in content_type:
        return document + b"\n"
    return f"\n[custody: the stream was cut off: {reason}]\n".encode()


class CutOff:
    """Wraps a stream hook: if masking a record fails, the stream ends there with an error
    record; nothing after it is sent, and no record is ever sent unmasked."""

    def __init__(self, stream: RecordStream, f: http.HTTPFlow) -> None:
        self.stream, self.flow, self.failed = stream, f, ""

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.failed:
            return []
        try:
            return failclosed.chunks(self.stream(chunk))
        except Exception as e:
            self.failed = str(e) if isinstance(e, MaskError) else f"masking failed: {type(e).__name__}: {e}"
            logger.error("custody: masking a stream failed; cutting it off: %s", self.failed)
            context.of(self.flow).masking = {"error": self.failed, **self.stream.report.as_dict()}
            return [error_record(self.flow, self.failed)]


def reframe(f: http.HTTPFlow) -> None:
    """A masked stream is not the length the upstream announced: drop Content-Length, and
    chunk it for an HTTP/1.1 client (mitmproxy chunks what says so); an HTTP/1.0 client
    reads it until the connection closes, which mitmproxy then does."""
    f.response.headers.pop("content-length", None)
    if f.request.http_version == "HTTP/1.1" and "chunked" not in f.response.headers.get("transfer-encoding", "").lower():
        f.response.headers["transfer-encoding"] = "chunked"


class Masking:
    def __init__(self, settings: Settings, pool: MaskPool) -> None:
        self.settings = settings
        self.pool = pool

    @property
    def detector(self):
        """The detector in this process (for streams and frames), once loaded."""
        return self.pool.detector

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        """When a mask applies, ask for JSON: a Kubernetes API server would otherwise answer
        typed clients in protobuf, which cannot be masked and would be refused. A
        port-forward is a tunnel of raw bytes: with masks to apply, it is refused. An ssh_bridge
        stream is text masked by detection frame by frame: it needs the detector here, and
        refuses field and key masks."""
        if not (masks := context.response_masks(context.of(f))):
            return
        op = context.of(f).operation
        if op is not None and op.protocol == "ssh" and f.request.headers.get("upgrade", "").lower() == "websocket":
            parsed = parse_all(masks)
            if any(m.kind != "detect" for m in parsed):
                failclosed.refuse(f, 502, "field and key masks need JSON, and command output is text; use detect "
                                          "masks", error=Error.MASKING_REFUSED)
            elif not await self.pool.loaded():
                failclosed.refuse(f, 502, "masking is not ready; the command was not run",
                                  error=Error.MASKING_UNAVAILABLE)
            return
        if op is not None and op.protocol == "kubernetes" and op.details.get("subresource") == "portforward":
            failclosed.refuse(f, 403, "a port-forward carries raw bytes that cannot be masked, and the rules that "
                                      f"allow it mask ({', '.join(map(str, masks))})", error=Error.MASKING_REFUSED)
            return
        accept = f.request.headers.get("accept", "")
        if "protobuf" in accept:
            kept = [a.strip() for a in accept.split(",") if "protobuf" not in a]
            f.request.headers["accept"] = ",".join(kept) or "application/json"

    @guarded
    def websocket_message(self, f: http.HTTPFlow) -> None:
        """Kubernetes exec/attach frames from the server: stdout (1) and stderr (2) masked
        with the detection masks, line by line. A frame that cannot be masked (text frames
        of the base64 protocols, or no detector) ends the session."""
        message = f.websocket.messages[-1]
        masks = parse_all(context.response_masks(context.of(f)))
        if not masks or message.from_client:
            return
        op = context.of(f).operation
        if op is not None and op.protocol == "ssh":
            self._ssh_frame(f, message, masks)
            return
        if not message.is_text and message.content[:1] in (b"\x01", b"\x02") and self.detector is not None:
            report = Report()
            text = message.content[1:].decode("utf-8", "replace")
            masked = Masker(masks, self.detector, self.settings.require().masking.hash_key).lines(text, report)
            if report.masked:
                message.content = message.content[:1] + masked.encode()
                c = context.of(f)
                c.masking = {**(c.masking or {}), "frames_masked": (c.masking or {}).get("frames_masked", 0) + 1}
        elif message.is_text or self.detector is None:
            message.drop()
            logger.error("custody: a WebSocket frame that cannot be masked; ending the session")
            f.kill()

    def _ssh_frame(self, f: http.HTTPFlow, message, masks) -> None:
        """An ssh_bridge stream frame from the terminal: stdout and stderr are records of
        text (the terminal cuts them so: addons/engine/masks.py TextRecords), masked line by
        line. One that cannot be masked becomes the stream's last frame, a STATUS naming the
        reason; every frame after it is dropped."""
        c = context.of(f)
        channel = message.content[:1]
        if (c.masking or {}).get("error"):
            message.drop()
            return
        if channel not in (bytes([STDOUT]), bytes([STDERR])):
            return
        try:
            report = Report()
            text = message.content[1:].decode("utf-8")
            masked = Masker(masks, self.detector, self.settings.require().masking.hash_key).lines(text, report)
        except (UnicodeDecodeError, MaskError) as e:
            reason = ("the command's output is not text and cannot be masked" if isinstance(e, UnicodeDecodeError)
                      else str(e))
            c.masking = {**(c.masking or {}), "error": reason}
            message.content = bytes([STATUS]) + json.dumps(
                {"exit_status": 126, "error": f"custody: {reason}", "event_id": c.decision_event}).encode()
            return
        totals = Report(**{k: Counter(v) for k, v in (c.masking or {}).items()
                           if k in ("fields", "entities")})
        totals.add(report)
        c.masking = {**totals.as_dict(), "frames_masked": (c.masking or {}).get("frames_masked", 0) + bool(report.masked)}
        if report.masked:
            message.content = message.content[:1] + masked.encode()

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if context.own_masking(c):
            return  # MCP message by message (addons/mcpguard.py), completions part by part (addons/modelguard.py)
        masks = context.response_masks(context.of(f))
        if c.decision is None or c.decision.effect != "allow" or f.response.status_code == 101:
            return  # our own refusals carry nothing to mask; upgraded sessions are masked per frame
        cfg = self.settings.require()
        parsed = parse_all(masks)
        if any(m.kind == "detect" for m in parsed) and self.detector is None:
            failclosed.refuse_at_headers(f, 502, "masking is not ready; the response was not sent", error=Error.MASKING_UNAVAILABLE)
            return
        masker = Masker(parsed, self.detector, cfg.masking.hash_key)
        if masks:
            self._mask_headers(f, masker)
        if is_stream(f):
            charset = charset_of(f.response.headers.get("content-type", "")).lower()
            if masks and charset not in ("", "utf-8", "utf8", "us-ascii", "ascii"):
                failclosed.refuse_at_headers(f, 502, f"a {charset} stream cannot be masked (streams are masked as UTF-8); it "
                                         "was not sent", error=Error.MASKING_REFUSED)
                return
            events = f.response.headers.get("content-type", "").lower().startswith("text/event-stream")
            stream = RecordStream(masker, cfg.masking.max_record, keep=cfg.store.max_body, events=events)
            f.response.stream = CutOff(stream, f)
            if masks:
                reframe(f)
            c.stream = stream
            c.masked = True
            return
        if not masks:
            return
        f.response.stream = False  # a body to be masked is buffered, never streamed through
        content_type = f.response.headers.get("content-type", "").lower()
        length = f.response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cfg.masking.max_body:
            failclosed.refuse_at_headers(f, 502, f"the response ({length} bytes) is larger than masking allows "
                                     f"({cfg.masking.max_body}); it was not sent", error=Error.MASKING_REFUSED)
        elif content_type.startswith(BINARY_TYPES) and "json" not in content_type:  # vnd.…+json is JSON
            failclosed.refuse_at_headers(f, 502, f"a {content_type} response cannot be masked; it was not sent", error=Error.MASKING_REFUSED)

    def _mask_headers(self, f: http.HTTPFlow, masker: Masker) -> None:
        report = Report()
        fields = masker.headers(list(f.response.headers.items(multi=True)), report)
        if report.masked:
            f.response.headers = http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                                               for k, v in fields])
            context.of(f).masking = {"headers": report.as_dict()}

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if context.own_masking(c):
            return  # addons/mcpguard.py, addons/modelguard.py
        if c.stream is not None:
            c.masking = {**c.stream.report.as_dict(), **(c.masking or {})}
            c.response_body = bytes(c.stream.sent)
            return
        if c.response_body is not None or c.decision is None or c.decision.effect != "allow":
            return
        masks = context.response_masks(context.of(f))
        if not masks or f.response.status_code == 101:
            # considered: no mask applies to this response (upgraded sessions: per frame)
            c.masked = bool(c.decision.masks)
            return
        content = f.response.get_content(strict=False) or b""
        cfg = self.settings.require().masking
        if len(content) > cfg.max_body:
            failclosed.refuse(f, 502, f"the response ({len(content)} bytes) is larger than masking allows "
                                      f"({cfg.max_body}); it was not sent", error=Error.MASKING_REFUSED)
            return
        try:
            masked, report = await self.pool.mask(content, f.response.headers.get("content-type", ""), masks)
        except MaskError as e:
            failclosed.refuse(f, 502, f"{e}; it was not sent", error=Error.MASKING_REFUSED)
            return
        except MaskUnavailable as e:
            logger.error("custody: masking unavailable for flow %s: %s", f.id, e, extra=context.log_fields(f))
            failclosed.refuse(f, 502, f"{e}; the response was not sent", error=Error.MASKING_UNAVAILABLE)
            return
        f.response.content = masked
        c.masked, c.masking = True, {**report, **(c.masking or {})}
