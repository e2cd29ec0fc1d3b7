"""A completion's event stream, event by event: read for its text, tool calls and usage,
and masked as it passes, never a fragment unmasked.

A model streams its answer in small deltas, and a secret or an address can be split
across two of them. So when masks apply, text is held until its line ends and sent a
line at a time, masked; a tool call's arguments are held until the call is complete and
sent whole, masked as the document they are; the events that repeat what was streamed
(a block's end, the final response object) carry what was sent. Without masks every event
passes as it came. Either way the stream is read into a Completion, which is `complete`
only once the API's last event arrived (`[DONE]`, `message_stop`, `response.completed`):
a stream cut mid-record is not, and its tool calls are never taken as asked for.

One class per wire format (Chat Completions, Responses, Anthropic Messages) on a common
base. Pure code (no mitmproxy).
"""

from __future__ import annotations

import json
from typing import Any

from addons.engine import llm
from addons.engine.masks import Masker, Report
from addons.engine.sse import Event, StreamError


def _dump(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


class CompletionStream:
    """The common part: text held by line, tool calls held whole (module docstring)."""

    def __init__(self, masker: Masker | None, report: Report, max_record: int) -> None:
        self.masker, self.report, self.max_record = masker, report, max_record
        self.completion = llm.Completion(complete=False)
        self.held: dict[tuple, str] = {}
        self.sent: dict[tuple, str] = {}
        self.calls: dict[tuple, dict[str, str]] = {}
        self.flushed: dict[tuple, str] = {}

    def __call__(self, ev: Event) -> bytes:
        if ev.data is None or not ev.data.strip():
            return ev.encode()  # comments, keep-alives
        return b"".join(e.encode() for e in self.event(ev))

    def event(self, ev: Event) -> list[Event]:
        raise NotImplementedError

    def doc(self, ev: Event) -> Any:
        try:
            return json.loads(ev.data)
        except ValueError:
            raise StreamError("an event of the stream is not JSON: this is not a completion stream") from None

    def text(self, key: tuple, fragment: str) -> str:
        """What to send now of a text fragment: all of it without masks, else the lines it completes."""
        if self.masker is None:
            self.sent[key] = self.sent.get(key, "") + fragment
            return fragment
        held = self.held.get(key, "") + fragment
        if len(held) > self.max_record:
            raise StreamError(f"a line of the completion is longer than {self.max_record} bytes")
        cut = held.rfind("\n") + 1
        self.held[key] = held[cut:]
        return self._send(key, held[:cut])

    def rest(self, key: tuple) -> str:
        """The held end of a text, masked, once its block ends."""
        return self._send(key, self.held.pop(key, ""))

    def _send(self, key: tuple, text: str) -> str:
        masked = self.masker.lines(text, self.report) if text and self.masker is not None else text
        self.sent[key] = self.sent.get(key, "") + masked
        return masked

    def call(self, key: tuple, cid: Any = None, name: Any = None, fragment: str = "") -> None:
        c = self.calls.setdefault(key, {"id": "", "name": "", "arguments": ""})
        c["id"] = c["id"] or str(cid or "")
        c["name"] = c["name"] or (name if isinstance(name, str) else "")
        c["arguments"] += fragment if isinstance(fragment, str) else ""
        if len(c["arguments"]) > self.max_record:
            raise StreamError(f"a tool call's arguments are longer than {self.max_record} bytes")

    def arguments(self, key: tuple) -> str:
        """A complete tool call's arguments as the agent gets them (masked once)."""
        if key not in self.flushed:
            raw = self.calls.get(key, {}).get("arguments", "")
            self.flushed[key] = raw if self.masker is None else llm.masked_arguments(self.masker, raw, self.report)
        return self.flushed[key]

    def finished(self) -> llm.Completion:
        """The completion read so far; `complete` once the API's last event arrived."""
        out = self.completion
        out.text = "".join(v for k, v in sorted(self.sent.items()) if k[0] == "text")
        out.tool_calls = [llm.tool_call(c["id"], c["name"], self.arguments(k)) for k, c in sorted(self.calls.items())
                          if c["name"]]
        return out.with_react() if out.complete else out

    def error_event(self, reason: str) -> bytes:
        raise NotImplementedError


class ChatStream(CompletionStream):
    """Chat Completions: `data:` chunks with choices' deltas, then `data: [DONE]`."""

    def event(self, ev: Event) -> list[Event]:
        if ev.data.strip() == "[DONE]":
            flushed = self._flush(getattr(self, "envelope", {}), list(self._open()))
            self.completion.complete = True
            return flushed + [ev]
        doc = self.doc(ev)
        if not isinstance(doc, dict):
            raise StreamError("a chunk of the stream is not a JSON object")
        if "error" in doc:
            self.completion.error = json.dumps(doc["error"])[:400]
            return [ev.with_data(_dump(self.masker.document(doc, self.report)))] if self.masker else [ev]
        self.envelope = {k: doc[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in doc}
        self.completion.model = str(doc.get("model") or self.completion.model)
        self.completion.usage.update(llm.usage_of(doc.get("usage")))
        choices, finishing = [], []
        for choice in doc.get("choices") or []:
            if not isinstance(choice, dict):
                raise StreamError("a choice of the stream is not a JSON object")
            i = choice.get("index", 0)
            delta = dict(choice.get("delta") or {})
            for field in ("content", "refusal", "reasoning_content"):
                if isinstance(delta.get(field), str):
                    delta[field] = self.text(("text" if field == "content" else field, i), delta[field])
            calls = []
            for tc in delta.get("tool_calls") or []:
                fn = tc.get("function") or {} if isinstance(tc, dict) else {}
                self.call(("call", i, tc.get("index", 0)), tc.get("id"), fn.get("name"), fn.get("arguments") or "")
                calls.append({**tc, "function": {**fn, "arguments": ""}} if self.masker and "arguments" in fn else tc)
            if "tool_calls" in delta:
                delta["tool_calls"] = calls
            if choice.get("finish_reason"):
                self.completion.finish = str(choice["finish_reason"])
                finishing.append(i)
            choices.append({**choice, "delta": delta})
        if self.masker is None:
            return [ev]
        return self._flush(self.envelope, finishing) + [ev.with_data(_dump({**doc, "choices": choices}))]

    def _open(self):
        return sorted({k[1] for k in [*self.held, *self.calls] if k[0] in ("text", "call", "refusal", "reasoning_content")})

    def _flush(self, envelope: dict[str, Any], indexes: list[int]) -> list[Event]:
        """A chunk per choice carrying what was held back, before the chunk that ends it."""
        if self.masker is None:
            return []
        out = []
        for i in indexes:
            delta: dict[str, Any] = {}
            for field, key in (("content", ("text", i)), ("refusal", ("refusal", i)),
                               ("reasoning_content", ("reasoning_content", i))):
                if key in self.held and (rest := self.rest(key)):
                    delta[field] = rest
            calls = [{"index": k[2], "function": {"arguments": self.arguments(k)}}
                     for k in sorted(self.calls) if k[:2] == ("call", i) and k not in self.flushed]
            if calls:
                delta["tool_calls"] = calls
            if delta:
                out.append(Event([("data", _dump({**envelope, "choices": [{"index": i, "delta": delta,
                                                                             "finish_reason": None}]}))]))
        return out

    def error_event(self, reason: str) -> bytes:
        return Event([("data", _dump({"error": {"message": f"custody: {reason}", "type": "custody",
                                                "code": "invalid_completion"}}))]).encode()


class MessagesStream(CompletionStream):
    """Anthropic Messages: message_start, content blocks (start, deltas, stop),
    message_delta, message_stop."""

    def event(self, ev: Event) -> list[Event]:
        doc = self.doc(ev)
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "message_start":
            message = doc.get("message") or {}
            self.completion.model = str(message.get("model") or "")
            self.completion.usage.update(llm.usage_of(message.get("usage")))
        elif kind == "content_block_start":
            return self._start(ev, doc)
        elif kind == "content_block_delta":
            return self._delta(ev, doc)
        elif kind == "content_block_stop":
            return self._stop(ev, doc)
        elif kind == "message_delta":
            self.completion.finish = str((doc.get("delta") or {}).get("stop_reason") or self.completion.finish)
            self.completion.usage.update(llm.usage_of(doc.get("usage")))
        elif kind == "message_stop":
            self.completion.complete = True
        elif kind == "error":
            self.completion.error = json.dumps(doc.get("error"))[:400]
            return [ev.with_data(_dump(self.masker.document(doc, self.report)))] if self.masker else [ev]
        return [ev]

    def _start(self, ev: Event, doc: dict[str, Any]) -> list[Event]:
        block, idx = doc.get("content_block") or {}, doc.get("index", 0)
        if block.get("type") == "tool_use":
            self.call(("call", idx), block.get("id"), block.get("name"),
                      _dump(block["input"]) if block.get("input") else "")
            return [ev]
        if block.get("type") in ("text", "thinking") and isinstance(block.get(block["type"]), str):
            sent = self.text(("text" if block["type"] == "text" else "thinking", idx), block[block["type"]])
            if self.masker is not None:
                return [ev.with_data(_dump({**doc, "content_block": {**block, block["type"]: sent}}))]
        return [ev]

    def _delta(self, ev: Event, doc: dict[str, Any]) -> list[Event]:
        delta, idx = doc.get("delta") or {}, doc.get("index", 0)
        if delta.get("type") == "input_json_delta":
            self.call(("call", idx), fragment=delta.get("partial_json", ""))
            return [] if self.masker is not None else [ev]
        for field, key in (("text", "text"), ("thinking", "thinking")):
            if delta.get("type") == f"{field}_delta" and isinstance(delta.get(field), str):
                sent = self.text((key, idx), delta[field])
                if self.masker is None:
                    return [ev]
                return [ev.with_data(_dump({**doc, "delta": {**delta, field: sent}}))] if sent else []
        return [ev]

    def _stop(self, ev: Event, doc: dict[str, Any]) -> list[Event]:
        idx = doc.get("index", 0)
        if self.masker is None:
            return [ev]
        out = []
        for field, key in (("text", ("text", idx)), ("thinking", ("thinking", idx))):
            if key in self.held and (rest := self.rest(key)):
                out.append(self._synthetic(idx, {"type": f"{field}_delta", field: rest}))
        if ("call", idx) in self.calls:
            out.append(self._synthetic(idx, {"type": "input_json_delta", "partial_json": self.arguments(("call", idx))}))
        return out + [ev]

    @staticmethod
    def _synthetic(idx: int, delta: dict[str, Any]) -> Event:
        return Event([("event", "content_block_delta"),
                      ("data", _dump({"type": "content_block_delta", "index": idx, "delta": delta}))])

    def error_event(self, reason: str) -> bytes:
        return Event([("event", "error"), ("data", _dump({"type": "error", "error": {
            "type": "api_error", "message": f"custody: {reason}"}}))]).encode()


class ResponsesStream(CompletionStream):
    """OpenAI Responses: typed events (`response.output_text.delta`, …), the whole response
    last (`response.completed`)."""

    def event(self, ev: Event) -> list[Event]:
        doc = self.doc(ev)
        if not isinstance(doc, dict):
            raise StreamError("an event of the stream is not a JSON object")
        kind = str(doc.get("type") or "")
        self.sequence = doc.get("sequence_number", getattr(self, "sequence", 0))
        at = (doc.get("output_index", 0), doc.get("content_index", doc.get("summary_index", 0)))
        key = ("summary" if "reasoning_summary" in kind else "text", *at)
        if kind in ("response.output_text.delta", "response.reasoning_summary_text.delta"):
            sent = self.text(key, str(doc.get("delta") or ""))
            if self.masker is None:
                return [ev]
            return [ev.with_data(_dump({**doc, "delta": sent}))] if sent else []
        if kind in ("response.output_text.done", "response.reasoning_summary_text.done"):
            return self._done_text(ev, doc, key)
        if kind == "response.function_call_arguments.delta":
            self.call(("call", at[0]), fragment=str(doc.get("delta") or ""))
            return [] if self.masker is not None else [ev]
        if kind == "response.function_call_arguments.done":
            return self._done_call(ev, doc, ("call", at[0]))
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = doc.get("item") or {}
            if item.get("type") == "function_call":
                self.call(("call", at[0]), item.get("call_id") or item.get("id"), item.get("name"))
            if kind.endswith("done") and self.masker is not None:
                return [ev.with_data(_dump({**doc, "item": self._item(at[0], item)}))]
            return [ev]
        if kind == "response.content_part.done" and self.masker is not None:
            part = doc.get("part") or {}
            if isinstance(part.get("text"), str):
                return [ev.with_data(_dump({**doc, "part": {**part, "text": self.sent.get(key, "")}}))]
        if kind.startswith("response.") and isinstance(doc.get("response"), dict):
            return self._response(ev, doc, kind)
        if kind == "error":
            self.completion.error = str(doc.get("message") or doc.get("code") or "error")[:400]
        return [ev]

    def _done_text(self, ev: Event, doc: dict[str, Any], key: tuple) -> list[Event]:
        if self.masker is None:
            return [ev]
        out = []
        if key in self.held and (rest := self.rest(key)):
            out.append(Event([("event", doc["type"].replace(".done", ".delta")), ("data", _dump({
                **{k: v for k, v in doc.items() if k not in ("text", "type")}, "type": doc["type"].replace(".done", ".delta"),
                "delta": rest, "logprobs": []}))]))
        return out + [ev.with_data(_dump({**doc, "text": self.sent.get(key, "")}))]

    def _done_call(self, ev: Event, doc: dict[str, Any], key: tuple) -> list[Event]:
        if self.masker is None:
            return [ev]
        arguments = self.arguments(key)
        delta = Event([("event", "response.function_call_arguments.delta"), ("data", _dump({
            **{k: v for k, v in doc.items() if k not in ("arguments", "type", "name")},
            "type": "response.function_call_arguments.delta", "delta": arguments}))])
        return [delta, ev.with_data(_dump({**doc, "arguments": arguments}))]

    def _item(self, index: int, item: dict[str, Any]) -> dict[str, Any]:
        """An output item as the agent got it, in parts: what was sent."""
        if item.get("type") == "function_call":
            return {**item, "arguments": self.arguments(("call", index))}
        if item.get("type") == "message" and isinstance(item.get("content"), list):
            return {**item, "content": [{**p, "text": self.sent.get(("text", index, n), "")}
                                        if isinstance(p, dict) and "text" in p else p
                                        for n, p in enumerate(item["content"])]}
        return llm.mask_completion(llm.RESPONSES, self.masker, {"output": [item]}, self.report)["output"][0]

    def _response(self, ev: Event, doc: dict[str, Any], kind: str) -> list[Event]:
        response = doc["response"]
        self.completion.model = str(response.get("model") or self.completion.model)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.completion.usage.update(llm.usage_of(response.get("usage")))
            self.completion.finish = str(response.get("status") or "")
            self.completion.complete = kind != "response.failed"
            if kind == "response.failed":
                self.completion.error = json.dumps(response.get("error"))[:400]
        if self.masker is None:
            return [ev]
        masked = dict(response)
        if isinstance(response.get("output"), list):
            masked["output"] = [self._item(n, item) if isinstance(item, dict) else item
                                for n, item in enumerate(response["output"])]
        if isinstance(response.get("instructions"), str):
            masked["instructions"] = llm.masked_text(self.masker, response["instructions"], self.report)
        return [ev.with_data(_dump({**doc, "response": masked}))]

    def error_event(self, reason: str) -> bytes:
        return Event([("event", "error"), ("data", _dump({
            "type": "error", "code": "invalid_completion", "message": f"custody: {reason}", "param": None,
            "sequence_number": getattr(self, "sequence", 0) + 1}))]).encode()


STREAMS = {llm.CHAT: ChatStream, llm.MESSAGES: MessagesStream, llm.RESPONSES: ResponsesStream}


def reader(name: str, masker: Masker | None, report: Report, max_record: int) -> CompletionStream:
    """The stream reader for a completion endpoint."""
    return STREAMS[name](masker, report, max_record)
