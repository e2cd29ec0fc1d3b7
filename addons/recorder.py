"""recorder: writes every request, decision and response to the hash-chained audit store.

On requests it writes the request and its decision before anything executes; if that write
fails, the request does not proceed. The request body and the operation (whose details hold
the same text: a statement's SQL, a command line) are stored masked alike, with the masks
fixed once for the flow (MaskPool.fix_record). On responses (after masking) it writes the response;
if that write fails, the agent gets an error instead of data that is not on record. A 101
carries no data, so its switch is not held for its write: every frame of the session (and
its end, or its error) waits for that write before its own, and a session whose 101 is
not on record ends before any frame passes. It
refuses to record, and so to forward, a response that a rule said to mask when no masker
ran. It also writes tunnels opened or refused, and upstream errors. Health probes
(`/healthz`, `/readyz`) are not recorded: they reach nothing, and a load balancer asks
several times a second.
The flow's comment and marker show the decision in mitmweb.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http

from addons import context, failclosed
from addons.auditlog import AuditLog
from addons.context import Context
from addons.engine.config import StoreConfig
from addons.engine.errors import Error
from addons.engine.model import MARKERS, new_id
from addons.engine.store import Event, body_fields, headers_for_record
from addons.failclosed import guarded
from addons.maskpool import MaskPool
from addons.settings import Settings
from addons.wellknown import PROBE

logger = logging.getLogger(__name__)



def _base(ctx: Context, f: mflow.Flow, kind: str, event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or new_id(),
        "kind": kind,
        "session": ctx.session,
        "flow": f.id,
        "principal": ctx.principal,
        "operation": ctx.recorded_operation,  # fixed by MaskPool.fix_record first
        "connection": ctx.connection,
        "approval": ctx.approval,
    }


WITHHELD_HINT = ("the request was forwarded and may have run, but its answer could not be recorded: check "
                 "whether it took effect before sending it again")
"""The hint of a response withheld (Error.AUDIT_UNAVAILABLE's own says nothing was forwarded)."""


class Recorder:
    def __init__(self, settings: Settings, log: AuditLog, pool: MaskPool) -> None:
        self.settings = settings
        self.log = log
        self.pool = pool
        self.store = StoreConfig(path="")

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            self.store = self.settings.require().store

    async def _write(self, ctx: Context, events: list[Event]) -> None:
        await self.log.write(events)
        ctx.events.extend(e.id for e in events)

    async def _write_switched(self, ctx: Context, events: list[Event]) -> None:
        """`_write` for a flow past its 101, once the 101's event is on record; raises if it
        is not. Every frame waits for it, not only the first: each side's frames are
        recorded concurrently."""
        if ctx.switched is not None:
            await asyncio.shield(ctx.switched)  # a frame's task cancelled must not cancel the 101's write
        await self._write(ctx, events)

    def _decision_event(self, ctx: Context, f: mflow.Flow, kind: str, **detail) -> Event:
        d = ctx.decision
        return Event(
            **_base(ctx, f, kind, ctx.decision_event),
            decision=d,
            status=d.status if d and d.status else None,
            detail=detail,
        )

    def _show(self, f: mflow.Flow, ctx: Context) -> None:
        d = ctx.decision
        if d is None:
            return
        rules = ",".join(d.rules) or "-"
        f.comment = f"custody: {d.effect} · rules {rules} · event {ctx.decision_event} · {d.reason}"
        f.marked = MARKERS[d.effect]

    @guarded
    async def http_connect(self, f: http.HTTPFlow) -> None:
        ctx = context.of(f)
        await self.pool.fix_record(ctx)
        event = self._decision_event(ctx, f, "connect", target=f"{f.request.host}:{f.request.port}")
        try:
            await self._write(ctx, [event])
        except Exception as e:
            self._unavailable(f, e)
            return
        ctx.recorded = True
        self._show(f, ctx)

    @guarded
    async def request(self, f: http.HTTPFlow) -> None:
        if f.metadata.get(PROBE):
            return
        ctx = context.of(f)
        req = f.request
        masks, [(body, withheld)] = await self.pool.fix_record_with(
            ctx, (req.get_content(strict=False), context.body_type(ctx, req.headers.get("content-type", ""))))
        request_event = Event(
            **_base(ctx, f, "request"),
            detail={
                "method": req.method,
                "url": req.pretty_url,
                "http_version": req.http_version,
                "headers": headers_for_record(self.pool.headers_for_record(req.headers, masks)),
                "client": list(f.client_conn.peername or ()),
                **({"body": withheld} if withheld else {}),
            },
            **body_fields(body, self.store),
            ts=req.timestamp_start,
        )
        try:
            await self._write(ctx, [request_event, self._decision_event(ctx, f, "decision")])
        except Exception as e:
            self._unavailable(f, e)
            return
        ctx.recorded = True
        self._show(f, ctx)

    def _unavailable(self, f: mflow.Flow, exc: Exception) -> None:
        logger.error("custody: audit store write failed; refusing the flow", exc_info=exc, extra=context.log_fields(f))
        failclosed.refuse(
            f, 503, f"audit store unavailable ({type(exc).__name__}); nothing was forwarded",
            error=Error.AUDIT_UNAVAILABLE, extra={"forwarded": False},
        )
        context.of(f).recorded = False

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        if f.metadata.get(PROBE):
            return
        ctx = context.of(f)
        await self.pool.fix_record(ctx)
        d = ctx.decision
        if d is not None and d.effect != "deny" and d.masks and not ctx.masked:
            failclosed.refuse(
                f, 502, f"rules {', '.join(d.rules)} require masking but no masker ran; response withheld",
                error=Error.MASKING_UNAVAILABLE, rules=d.rules,
            )
        resp = f.response
        late = [] if ctx.decision is None or ctx.decision_event in ctx.events else [
            self._decision_event(ctx, f, "decision")
        ]
        detail = {
            "headers": headers_for_record(self.pool.headers_for_record(resp.headers, context.response_masks(ctx))),
            "elapsed_ms": round(((resp.timestamp_end or resp.timestamp_start) - f.request.timestamp_start) * 1000, 3),
            "upstream": f.server_conn.timestamp_start is not None,
        }
        if ctx.masking:
            detail["masking"] = ctx.masking
        if ctx.transaction:
            detail["transaction"] = ctx.transaction
        if ctx.stream is not None:
            detail["streamed"] = ctx.stream.size
        body = ctx.response_body if ctx.response_body is not None else resp.get_content(strict=False)
        event = Event(
            **_base(ctx, f, "response"),
            status=resp.status_code,
            detail=detail,
            **body_fields(body, self.store),
            ts=resp.timestamp_end or resp.timestamp_start,
        )
        if resp.status_code == 101:
            ctx.switched = asyncio.ensure_future(self._write(ctx, [*late, event]))
            ctx.switched.add_done_callback(lambda w: self._switch_written(w, f))
            return
        try:
            await self._write(ctx, [*late, event])
        except Exception as e:
            if d is not None and d.effect == "deny":  # our own refusal: nothing of the upstream's to withhold
                logger.error("custody: audit store write failed; the refusal goes out unrecorded", exc_info=e,
                             extra=context.log_fields(f))
                return
            logger.error("custody: audit store write failed; withholding the response", exc_info=e,
                         extra=context.log_fields(f))
            failclosed.refuse(
                f, 502, f"audit store unavailable ({type(e).__name__}); response withheld",
                error=Error.AUDIT_UNAVAILABLE, extra={"forwarded": True, "hint": WITHHELD_HINT},
            )

    @staticmethod
    def _switch_written(write: asyncio.Future, f: http.HTTPFlow) -> None:
        if not write.cancelled() and write.exception() is not None:
            logger.error("custody: audit store write failed for a 101; the session ends at its first frame",
                         exc_info=write.exception(), extra=context.log_fields(f))

    @guarded
    async def error(self, f: http.HTTPFlow) -> None:
        ctx = context.of(f)
        await self.pool.fix_record(ctx)
        event = Event(**_base(ctx, f, "error"), detail={"error": f.error.msg if f.error else ""})
        try:
            await self._write_switched(ctx, [event])
        except Exception:
            logger.exception("custody: audit store write failed while recording an error", extra=context.log_fields(f))

    @guarded
    async def websocket_message(self, f: http.HTTPFlow) -> None:
        """Every frame of a governed session (Kubernetes exec: stdin, stdout, stderr) is an
        event of that flow. Frames from the server arrive masked (the masking addon ran);
        what the agent typed goes to the pod as typed and is masked for the record."""
        ctx = context.of(f)
        await self.pool.fix_record(ctx)
        message = f.websocket.messages[-1]
        channel = message.content[0] if message.content and not message.is_text else None
        content, withheld = message.content, ""
        if message.from_client and channel is not None:
            stored, withheld = await self.pool.for_record(content[1:], "text/plain", context.response_masks(ctx))
            content = None if stored is None else content[:1] + stored
        event = Event(**_base(ctx, f, "message"),
                      detail={"from_client": message.from_client, "channel": channel, "text": message.is_text,
                              "dropped": message.dropped, **({"body": withheld} if withheld else {})},
                      **body_fields(content, self.store))
        try:
            await self._write_switched(ctx, [event])
        except Exception as e:
            logger.error("custody: audit store write failed; ending the session", exc_info=e,
                         extra=context.log_fields(f))
            message.drop()
            f.kill()

    @guarded
    async def websocket_end(self, f: http.HTTPFlow) -> None:
        ctx = context.of(f)
        await self.pool.fix_record(ctx)
        ws = f.websocket
        await self._write_switched(ctx, [Event(**_base(ctx, f, "session_end"),
                                      detail={"close_code": ws.close_code, "close_reason": ws.close_reason,
                                              "messages": len(ws.messages), "masking": ctx.masking})])

