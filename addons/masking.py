"""masking: responses are masked in transit, as the decision's masks say, or refused.

- Ordinary bodies are buffered and masked in the worker processes (addons/maskpool.py).
- Streams (server-sent events, JSON lines, Kubernetes `watch` and `follow`) are masked
  record by record as they pass, through mitmproxy's stream hook (addons/engine/masks.py
  RecordStream), in this process: records are small, and a stream cannot wait for a pool.
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

from mitmproxy import http

from addons import context, failclosed
from addons.engine.errors import Error
from addons.engine.masks import Masker, MaskError, RecordStream, Report, parse_all
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
    query = f.request.query
    return query.get("watch", "") in ("true", "1") or query.get("follow", "") in ("true", "1")


def is_watch(f: http.HTTPFlow) -> bool:
    op = context.of(f).operation
    return op is not None and op.protocol == "kubernetes" and op.details.get("verb") == "watch"


class Drain:
    """A stream hook for a response refused at its headers: drop the upstream's bytes, then
    send the refusal's own body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, chunk: bytes) -> bytes:
        return self.body if chunk == b"" else b""


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


def refuse_at_headers(f: http.HTTPFlow, status: int, reason: str, error: str) -> None:
    """Refuse a response as its headers arrive: the upstream's bytes are drained, never
    forwarded, and the refusal's own body is sent (and recorded)."""
    failclosed.refuse(f, status, reason, error=error)
    f.response.stream = Drain(f.response.content)
    context.of(f).response_body = f.response.content


class CutOff:
    """Wraps a stream hook: if masking a record fails, the stream ends there with an error
    record; nothing after it is sent, and no record is ever sent unmasked."""

    def __init__(self, stream: RecordStream, f: http.HTTPFlow) -> None:
        self.stream, self.flow, self.failed = stream, f, ""

    def __call__(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        try:
            return self.stream(chunk)
        except Exception as e:
            self.failed = str(e) if isinstance(e, MaskError) else f"masking failed: {type(e).__name__}: {e}"
            logger.error("custody: masking a stream failed; cutting it off: %s", self.failed)
            context.of(self.flow).masking = {"error": self.failed, **self.stream.report.as_dict()}
            return error_record(self.flow, self.failed)


class Masking:
    def __init__(self, settings: Settings, pool: MaskPool) -> None:
        self.settings = settings
        self.pool = pool

    @property
    def detector(self):
        """The detector in this process (for streams and frames), once loaded."""
        return self.pool.detector

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        """When a mask applies, ask for JSON: a Kubernetes API server would otherwise answer
        typed clients in protobuf, which cannot be masked and would be refused. A
        port-forward is a tunnel of raw bytes: with masks to apply, it is refused."""
        if not (masks := context.response_masks(context.of(f))):
            return
        op = context.of(f).operation
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

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol == "mcp":
            return  # masked message by message, with the tools offered filtered first: addons/mcpguard.py
        masks = context.response_masks(context.of(f))
        if c.decision is None or c.decision.effect != "allow" or f.response.status_code == 101:
            return  # our own refusals carry nothing to mask; upgraded sessions are masked per frame
        cfg = self.settings.require()
        if is_stream(f):
            parsed = parse_all(masks)
            if any(m.kind == "detect" for m in parsed) and self.detector is None:
                refuse_at_headers(f, 502, "masking is not ready; the stream was not sent", "masking_unavailable")
                return
            stream = RecordStream(Masker(parsed, self.detector, cfg.masking.hash_key), cfg.masking.max_record,
                                  keep=cfg.store.max_body)
            f.response.stream = CutOff(stream, f)
            c.stream = stream
            c.masked = True
            return
        if not masks:
            return
        f.response.stream = False  # a body to be masked is buffered, never streamed through
        content_type = f.response.headers.get("content-type", "").lower()
        length = f.response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cfg.masking.max_body:
            refuse_at_headers(f, 502, f"the response ({length} bytes) is larger than masking allows "
                                     f"({cfg.masking.max_body}); it was not sent", "masking_refused")
        elif content_type.startswith(BINARY_TYPES) and "json" not in content_type:  # vnd.…+json is JSON
            refuse_at_headers(f, 502, f"a {content_type} response cannot be masked; it was not sent", "masking_refused")

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol == "mcp":
            return  # addons/mcpguard.py
        if c.stream is not None:
            c.masking = c.masking or c.stream.report.as_dict()
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
            logger.error("custody: masking unavailable for flow %s: %s", f.id, e)
            failclosed.refuse(f, 502, f"{e}; the response was not sent", error=Error.MASKING_UNAVAILABLE)
            return
        f.response.content = masked
        c.masked, c.masking = True, report
