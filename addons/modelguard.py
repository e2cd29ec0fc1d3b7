"""modelguard: the model side of the chain — what a model call is, and what its completion
says and asks for.

On the request (before policy):
- a body that is not a request of its endpoint's API, or a request in the other wire format
  than the connection speaks (an Anthropic Messages call to an OpenAI connection), is
  refused (400 `invalid_model_request`); nothing reaches the provider;
- the provider credentials the agent sent (Authorization, x-api-key, api-key) are removed:
  the gateway holds the provider's key (addons/credentials.py puts it on).

On the response (before masking, which leaves completions to this addon):
- a completion is read (Chat Completions, Responses, Anthropic Messages), whole or as an
  event stream record by record (addons/engine/llmstream.py), and masked with the
  decision's masks: its text, refusals, reasoning and the arguments of its tool calls. An
  answer that is not a completion of its API is withheld (502 `invalid_completion`); a
  stream that fails or is cut mid-record ends with an error event in its own format;
- the completion goes on record as a `completion` event (model, text, tool calls, token
  usage), and the tool calls it asks for are remembered for provenance
  (addons/engine/provenance.py), once it is complete and, when whole, on record; they are
  kept in the store with the completion's event too (`ToolCall`), for the other replicas.
  Tool calls whose arguments are not JSON are recorded, never remembered.
"""

from __future__ import annotations

import json
import logging
import time

from mitmproxy import http

from addons import context, failclosed
from addons.auditlog import AuditLog
from addons.engine import llm, llmstream
from addons.engine.config import Connection
from addons.engine.errors import Error
from addons.engine.masks import Masker, MaskError, Report
from addons.engine.model import new_id
from addons.engine.provenance import Asked, Ledger, key_of
from addons.engine.sse import EventStream
from addons.engine.store import Event, ToolCall
from addons.failclosed import guarded
from addons.maskpool import MaskPool, MaskUnavailable
from addons.masking import reframe
from addons.settings import Settings

logger = logging.getLogger(__name__)

PROVIDER_KEYS = ("authorization", "x-api-key", "api-key")
"""Where model SDKs put the provider's API key: the gateway's to fill in, never the agent's."""
SPEAKS = {llm.OPENAI: "OpenAI's API (Chat Completions, Responses)", llm.ANTHROPIC: "Anthropic's API (Messages)"}


def completion_endpoint(c: context.Context) -> str | None:
    """The completion endpoint of a model call, or None when it answers something else."""
    name = c.operation.details.get("endpoint") if c.operation is not None else None
    return name if name in llm.COMPLETIONS else None


class ModelGuard:
    def __init__(self, settings: Settings, log: AuditLog, pool: MaskPool, ledger: Ledger) -> None:
        self.settings, self.log, self.pool, self.ledger = settings, log, pool, ledger

    # the request

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "llm" or c.operation is None:
            return
        for name in PROVIDER_KEYS:
            f.request.headers.pop(name, None)
        d = c.operation.details
        if "invalid" in d:
            failclosed.refuse(f, 400, f"{d['invalid']}; nothing was sent", error=Error.INVALID_MODEL_REQUEST)
            return
        conn = self.settings.registry.by_name[c.connection]
        if d.get("format") and d["format"] != conn.llm.api:
            failclosed.refuse(f, 400, f"{conn.name} speaks {SPEAKS[conn.llm.api]}, and {d['path']} is "
                                      f"{llm.API_NAMES[d['endpoint']]}; nothing was sent",
                              error=Error.INVALID_MODEL_REQUEST)

    # the response

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol != "llm" or not c.cleared or (name := completion_endpoint(c)) is None:
            return
        resp = f.response
        if not resp.headers.get("content-type", "").lower().startswith("text/event-stream") or resp.status_code != 200:
            resp.stream = False  # read, masked and recorded whole, in the response hook
            return
        masker = None
        if c.decision.masks:
            try:
                masker = self.pool.masker(c.decision.masks)
            except MaskError:
                failclosed.refuse_at_headers(f, 502, "masking is not ready; the completion was not sent",
                                             error=Error.MASKING_UNAVAILABLE)
                return
            reframe(f)
        c.stream = resp.stream = CompletionRelay(self, f, c, name, masker)
        c.masked = True

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol != "llm" or c.decision is None or c.decision.effect != "allow" \
                or (name := completion_endpoint(c)) is None:
            return
        if isinstance(c.stream, CompletionRelay):
            await self._streamed(f, c, c.stream)
            return
        if c.response_body is not None:
            return  # refused as its headers arrived
        c.masked = True
        content = f.response.get_content(strict=False) or b""
        if not 200 <= f.response.status_code < 300:
            await self._masked(f, c, content, f.response.headers.get("content-type", ""))  # the provider's error
            return
        try:
            completion = llm.read_completion(name, json.loads(content))
        except (ValueError, UnicodeDecodeError, llm.Unreadable) as e:
            failclosed.refuse(f, 502, f"the model server's answer is not a completion of {llm.API_NAMES[name]} "
                                      f"({e}); it was not sent", error=Error.INVALID_COMPLETION)
            return
        if c.decision.masks:
            if not await self._masked(f, c, content, llm.content_type("completion", name)):
                return
            completion = llm.read_completion(name, json.loads(f.response.content))
        event = self.event(f, c, new_id(), name, completion, streamed=False)
        asked = self.asked(f, c, event.id, completion)
        try:
            await self.log.write([event], self.kept(c, asked))
        except Exception as e:
            logger.error("custody: audit store write failed; withholding the completion", exc_info=e)
            failclosed.refuse(f, 502, f"audit store unavailable ({type(e).__name__}); the completion was withheld",
                              error=Error.AUDIT_UNAVAILABLE)
            return
        c.events.append(event.id)
        self.remember(c, asked)

    async def _masked(self, f: http.HTTPFlow, c: context.Context, content: bytes, content_type: str) -> bool:
        """The response body masked in the workers, or refused."""
        if not c.decision.masks or not content:
            return True
        try:
            body, report = await self.pool.mask(content, content_type, c.decision.masks)
        except MaskError as e:
            failclosed.refuse(f, 502, f"{e}; it was not sent", error=Error.MASKING_REFUSED)
            return False
        except MaskUnavailable as e:
            failclosed.refuse(f, 502, f"{e}; the answer was not sent", error=Error.MASKING_UNAVAILABLE)
            return False
        f.response.content = body
        c.masking = {**(c.masking or {}), **report}
        return True

    async def _streamed(self, f: http.HTTPFlow, c: context.Context, relay: CompletionRelay) -> None:
        """A streamed completion, once it ended: on record (its tool calls were remembered
        as its last event passed; they are forgotten if it cannot be recorded)."""
        c.response_body = bytes(relay.sent)
        c.masking = {**(c.masking or {}), **relay.report.as_dict()}
        await self.record_stream(f, c, relay)

    async def record_stream(self, f: http.HTTPFlow, c: context.Context, relay: CompletionRelay) -> None:
        if relay.recorded:
            return
        relay.recorded = True
        event = self.event(f, c, relay.event_id, relay.name, relay.finished(), streamed=True)
        try:
            await self.log.write([event], self.kept(c, relay.asked))
        except Exception as e:
            self.ledger.forget(relay.event_id)
            logger.error("custody: audit store write failed for a streamed completion; its tool calls are "
                         "forgotten", exc_info=e)
            return
        c.events.append(event.id)

    @guarded
    async def error(self, f: http.HTTPFlow) -> None:
        """A stream whose upstream went away: what arrived goes on record, incomplete."""
        c = context.of(f)
        if isinstance(c.stream, CompletionRelay):
            c.stream.failed = c.stream.failed or (f.error.msg if f.error else "the stream broke off")
            await self.record_stream(f, c, c.stream)

    def event(self, f: http.HTTPFlow, c: context.Context, event_id: str, name: str, completion: llm.Completion,
              streamed: bool) -> Event:
        detail = completion.as_dict()
        detail["text"] = detail["text"][: self.settings.require().store.max_body]
        detail.update(endpoint=name, streamed=streamed, requested=c.operation.details.get("model", ""))
        return Event(id=event_id, kind="completion", session=c.session, flow=f.id, principal=c.principal,
                     operation=c.recorded_operation or c.operation, connection=c.connection, approval=c.approval,
                     detail=detail)

    def asked(self, f: http.HTTPFlow, c: context.Context, event_id: str,
              completion: llm.Completion) -> list[tuple[int, Asked]]:
        """The tool calls a complete completion asks for, for the requests that carry them
        out, each with its place in the completion."""
        if not completion.complete or c.principal is None:
            return []
        conn: Connection = self.settings.registry.by_name[c.connection]
        now = time.time()
        model = completion.model or c.operation.details.get("model", "")
        return [(n, Asked(event=event_id, flow=f.id, connection=conn.name, model=model,
                          call=tc.id or f"{event_id}#{n}", tool=tc.name, arguments=tc.arguments,
                          text=tc.text if tc.form == "react" else f"{tc.name}({tc.text})", form=tc.form, at=now,
                          expires=now + conn.llm.remember))
                for n, tc in enumerate(completion.tool_calls) if not tc.invalid]

    def remember(self, c: context.Context, asked: list[tuple[int, Asked]]) -> None:
        if asked:
            self.ledger.remember(key_of(c.principal), [a for _, a in asked])

    @staticmethod
    def kept(c: context.Context, asked: list[tuple[int, Asked]]) -> list[ToolCall]:
        """The tool calls as the store keeps them beside the completion's event."""
        return [ToolCall(key_of(c.principal), n, a) for n, a in asked]


class CompletionRelay:
    """The stream hook of a completion's event stream: each event read, masked and sent
    (addons/engine/llmstream.py); the tool calls remembered as the last event passes, before
    the agent has it; anything that goes wrong ends the stream with an error event in the
    API's own format, and nothing after it is sent."""

    def __init__(self, guard: ModelGuard, f: http.HTTPFlow, c: context.Context, name: str,
                 masker: Masker | None) -> None:
        cfg = guard.settings.require()
        self.guard, self.flow, self.ctx, self.name = guard, f, c, name
        self.report = Report()
        self.reader = llmstream.reader(name, masker, self.report, cfg.masking.max_record)
        self.events = EventStream(self.event, cfg.masking.max_record, keep=cfg.store.max_body)
        self.event_id = new_id()
        self.failed = ""
        self.asked: list[tuple[int, Asked]] = []
        self.remembered = self.recorded = False

    @property
    def size(self) -> int:
        return self.events.size

    @property
    def sent(self) -> bytearray:
        return self.events.sent

    def __call__(self, chunk: bytes) -> list[bytes]:
        if self.failed:
            return []
        try:
            cut = chunk == b"" and bool(self.events.pending.strip())
            out = self.events(chunk)
            if chunk == b"" and not self.reader.completion.complete:
                self.failed = ("the stream was cut off mid-record" if cut else
                               "the stream ended before the completion did")
                out += self.events.account(self.reader.error_event(self.failed))
        except Exception as e:
            self.failed = str(e) or type(e).__name__
            logger.error("custody: a completion stream failed; cutting it off: %s", self.failed)
            out = self.events.account(self.reader.error_event(f"{self.failed}; the rest of the completion was withheld"))
        return failclosed.chunks(out)

    def event(self, ev) -> bytes:
        out = self.reader(ev)
        if self.reader.completion.complete and not self.remembered:
            self.remembered = True
            self.asked = self.guard.asked(self.flow, self.ctx, self.event_id, self.reader.finished())
            self.guard.remember(self.ctx, self.asked)
        return out

    def finished(self) -> llm.Completion:
        done = self.reader.finished()
        if self.failed:
            done.complete, done.error = False, done.error or self.failed
        return done
