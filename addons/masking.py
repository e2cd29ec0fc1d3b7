"""masking: responses are masked in transit, as the decision's masks say, or refused.

- Ordinary bodies are buffered and masked in the worker processes (addons/maskpool.py).
- Streams (server-sent events, JSON lines, Kubernetes `watch` and `follow`) are masked
  record by record as they pass, through mitmproxy's stream hook (addons/masks.py
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

import asyncio
import json
import logging

from mitmproxy import http

from addons import context, failclosed
from addons.maskpool import MaskPool, MaskUnavailable
from addons.masks import Masker, MaskError, RecordStream, parse_all
from addons.failclosed import guarded
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
    query = f.request.query
    return query.get("watch", "") in ("true", "1") or query.get("follow", "") in ("true", "1")


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
    if f.request.query.get("watch") in ("true", "1"):
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError",
                  "code": 502, "message": f"custody: {reason}"}
        return json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"
    document = json.dumps({"error": "masking_refused", "reason": reason}).encode()
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
        self.detector = None
        self._loading: asyncio.Future | None = None

    def running(self) -> None:
        self._loading = asyncio.ensure_future(self._load_detector())

    async def _load_detector(self) -> None:
        from addons.detectors import Detector  # Presidio: imported off the event loop

        self.detector = await asyncio.to_thread(Detector, self.settings.require().masking.ner_model)

    def _refuse_now(self, f: http.HTTPFlow, status: int, reason: str, error: str) -> None:
        failclosed.refuse(f, status, reason, error=error)
        f.response.stream = Drain(f.response.content)
        context.of(f).response_body = f.response.content

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        d = c.decision
        if d is None or d.effect != "allow":
            return  # our own refusals carry nothing to mask
        cfg = self.settings.require()
        if is_stream(f):
            masks = parse_all(d.masks)
            if any(m.kind == "detect" for m in masks) and self.detector is None:
                self._refuse_now(f, 502, "masking is not ready; the stream was not sent", "masking_unavailable")
                return
            stream = RecordStream(Masker(masks, self.detector, cfg.masking.hash_key), cfg.masking.max_record,
                                  keep=cfg.store.max_body)
            f.response.stream = CutOff(stream, f)
            c.stream = stream
            c.masked = True
            return
        if not d.masks:
            return
        f.response.stream = False  # a body to be masked is buffered, never streamed through
        content_type = f.response.headers.get("content-type", "").lower()
        length = f.response.headers.get("content-length", "")
        if length.isdigit() and int(length) > cfg.masking.max_body:
            self._refuse_now(f, 502, f"the response ({length} bytes) is larger than masking allows "
                                     f"({cfg.masking.max_body}); it was not sent", "masking_refused")
        elif content_type.startswith(BINARY_TYPES):
            self._refuse_now(f, 502, f"a {content_type} response cannot be masked; it was not sent", "masking_refused")

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        d = c.decision
        if c.stream is not None:
            c.masking = c.masking or c.stream.report.as_dict()
            c.response_body = bytes(c.stream.sent)
            return
        if d is None or d.effect != "allow" or not d.masks or c.response_body is not None:
            return
        content = f.response.get_content(strict=False) or b""
        cfg = self.settings.require().masking
        if len(content) > cfg.max_body:
            failclosed.refuse(f, 502, f"the response ({len(content)} bytes) is larger than masking allows "
                                      f"({cfg.max_body}); it was not sent", error="masking_refused")
            return
        try:
            masked, report = await self.pool.mask(content, f.response.headers.get("content-type", ""), d.masks)
        except MaskError as e:
            failclosed.refuse(f, 502, f"{e}; it was not sent", error="masking_refused")
            return
        except MaskUnavailable as e:
            logger.error("custody: masking unavailable for flow %s: %s", f.id, e)
            failclosed.refuse(f, 502, f"{e}; the response was not sent", error="masking_unavailable")
            return
        f.response.content = masked
        c.masked, c.masking = True, report
