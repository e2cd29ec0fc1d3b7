"""A model API for the walkthrough: the example's deterministic stand-in model
(examples/samples/standin.py) served over HTTPS the way providers and local servers serve
models, so the crew runs offline exactly as it would against a provider.

It speaks both wire formats: OpenAI's Chat Completions (/v1/chat/completions) and
Responses (/v1/responses), and Anthropic's Messages (/v1/messages), whole or streamed as
server-sent events, with function calls when a call offers tools (CrewAI's ReAct text
otherwise), token usage, and GET /v1/models. It answers only requests that carry the API
key the gateway holds (DIR/api.key: `Authorization: Bearer …` or `x-api-key`), so a call
that did not come through Custody gets 401. Its certificate comes from its own CA in
DIR/ca.pem, which the connection pins.

    python examples/sample_model.py --port 8766 --dir .custody/sample-model

--plans FILE adds plans (a JSON object: task key -> steps) to the crew's; --log FILE
appends one JSON line per request that reached it (tests read what the provider saw).
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import os
import secrets
import signal
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.samples import standin  # noqa: E402
from examples.samples.pki import CA  # noqa: E402

IDS = itertools.count(1)
CHUNK = 12
"""Characters per streamed delta: small, so clients reassemble text and arguments."""


def prepare(directory: Path) -> tuple[tuple[Path, Path], str]:
    """The server's CA, certificate and API key (made once)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / "api.key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("sk-sample-" + secrets.token_urlsafe(24) + "\n")
    ca = CA(directory, "sample-model-ca")
    (directory / "ca.pem").write_bytes(ca.cert_file.read_bytes())
    return ca.issue("localhost"), key_file.read_text().strip()


def pieces(text: str) -> list[str]:
    return [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]


def tokens(text: str) -> int:
    return max(1, len(text) // 4)


class Conversation:
    """A request as the script reads it: all its text, the steps done, the last result."""

    def __init__(self, text: str, results: list[str], offered: list[str], assistant: list[str]) -> None:
        self.text, self.offered = text, offered
        if offered or results:  # function calling: a step is done per tool result
            self.done, self.last = len(results), results[-1] if results else ""
        else:  # ReAct: CrewAI appends each action with its observation as an assistant message
            self.done, self.last = len(assistant), assistant[-1] if assistant else ""

    def turn(self, plans: dict[str, list]) -> standin.Turn:
        return standin.reply(plans, self.text, self.done, self.last, self.offered)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text(p.get("text") or p.get("content") or p.get("output") or "") for p in content
                         if isinstance(p, dict))
    return ""


def read_chat(doc: dict[str, Any]) -> Conversation:
    messages = doc["messages"]
    return Conversation("\n".join(_text(m.get("content")) for m in messages),
                        [_text(m.get("content")) for m in messages if m.get("role") == "tool"],
                        [t["function"]["name"] for t in doc.get("tools") or []],
                        [_text(m.get("content")) for m in messages if m.get("role") == "assistant"])


def read_responses(doc: dict[str, Any]) -> Conversation:
    items = doc["input"] if isinstance(doc["input"], list) else [{"role": "user", "content": doc["input"]}]
    text = "\n".join([doc.get("instructions") or ""] + [_text(i.get("content") or i.get("output")) for i in items])
    return Conversation(text, [str(i.get("output")) for i in items if i.get("type") == "function_call_output"],
                        [t["name"] for t in doc.get("tools") or [] if t.get("type") == "function"],
                        [_text(i.get("content")) for i in items if i.get("role") == "assistant"])


def read_messages(doc: dict[str, Any]) -> Conversation:
    messages = doc["messages"]
    results = [_text(b.get("content")) for m in messages if isinstance(m.get("content"), list)
               for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"]
    text = "\n".join([_text(doc.get("system"))] + [_text(m.get("content")) for m in messages])
    return Conversation(text, results, [t["name"] for t in doc.get("tools") or []],
                        [_text(m.get("content")) for m in messages if m.get("role") == "assistant"])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small writes (headers, then each event) go out at once, not after a delayed ACK
    key = ""
    plans: dict[str, list] = {}
    log_file = ""
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _log(self, body: bytes) -> None:
        if self.log_file:
            with self.lock, open(self.log_file, "a") as fh:
                fh.write(json.dumps({"method": self.command, "path": self.path, "body": body.decode(errors="replace"),
                                     "headers": {k.lower(): v for k, v in self.headers.items()}}) + "\n")

    def _json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorised(self) -> bool:
        given = self.headers.get("x-api-key") or self.headers.get("authorization", "").removeprefix("Bearer ")
        if hmac.compare_digest(given, self.key):
            return True
        self._json(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
                   if self.path.endswith("/messages") else
                   {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                              "code": "invalid_api_key"}})
        return False

    def do_GET(self) -> None:
        self._log(b"")
        if not self._authorised():
            return
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": standin.MODEL, "object": "model", "owned_by": "custody"}]})
        else:
            self._json(404, {"error": {"message": f"no such endpoint {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._log(body)
        if not self._authorised():
            return
        doc = json.loads(body)
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/chat/completions"):
            self._answer(doc, read_chat(doc), self._chat, self._chat_stream)
        elif path.endswith("/responses"):
            self._answer(doc, read_responses(doc), self._responses, self._responses_stream)
        elif path.endswith("/messages"):
            self._answer(doc, read_messages(doc), self._messages, self._messages_stream)
        else:
            self._json(404, {"error": {"message": f"no such endpoint {self.path}", "type": "invalid_request_error"}})

    def _answer(self, doc, conversation: Conversation, whole, streamed) -> None:
        turn = conversation.turn(self.plans)
        usage = (tokens(conversation.text), tokens(turn.text + json.dumps(turn.arguments or {})))
        call_id = f"call_{next(IDS):04d}"
        if doc.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for event in streamed(doc, turn, usage, call_id):
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json(200, whole(doc, turn, usage, call_id))

    # OpenAI Chat Completions

    @staticmethod
    def _chat(doc, turn: standin.Turn, usage, call_id) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn.text if not turn.tool or turn.react else None}
        if turn.tool and not turn.react:
            message["tool_calls"] = [{"id": call_id, "type": "function",
                                      "function": {"name": turn.tool, "arguments": json.dumps(turn.arguments)}}]
        return {"id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": int(time.time()),
                "model": doc["model"], "choices": [{"index": 0, "message": message, "logprobs": None,
                                                    "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}],
                "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}

    @staticmethod
    def _chat_stream(doc, turn: standin.Turn, usage, call_id):
        head = {"id": f"chatcmpl-{call_id}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": doc["model"]}

        def chunk(delta, finish=None, **extra) -> bytes:
            return b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                           **extra}).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        if turn.tool and not turn.react:
            yield chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                         "function": {"name": turn.tool, "arguments": ""}}]})
            for part in pieces(json.dumps(turn.arguments)):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
            yield chunk({}, "tool_calls")
        else:
            for part in pieces(turn.text):
                yield chunk({"content": part})
            yield chunk({}, "stop")
        if (doc.get("stream_options") or {}).get("include_usage"):
            yield b"data: " + json.dumps({**head, "choices": [], "usage": {
                "prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    # OpenAI Responses

    @staticmethod
    def _output(turn: standin.Turn, call_id) -> list[dict[str, Any]]:
        if turn.tool and not turn.react:
            return [{"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": turn.tool,
                     "arguments": json.dumps(turn.arguments), "status": "completed"}]
        return [{"type": "message", "id": f"msg_{call_id}", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": turn.text, "annotations": []}]}]

    def _responses(self, doc, turn: standin.Turn, usage, call_id) -> dict[str, Any]:
        return {"id": f"resp_{call_id}", "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": doc["model"], "output": self._output(turn, call_id), "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": doc.get("tools") or [],
                "usage": {"input_tokens": usage[0], "output_tokens": usage[1], "total_tokens": sum(usage)}}

    def _responses_stream(self, doc, turn: standin.Turn, usage, call_id):
        sequence = itertools.count()

        def event(kind: str, **fields) -> bytes:
            return (f"event: {kind}\ndata: ".encode()
                    + json.dumps({"type": kind, "sequence_number": next(sequence), **fields}).encode() + b"\n\n")

        done = self._responses(doc, turn, usage, call_id)
        yield event("response.created", response={**done, "status": "in_progress", "output": []})
        item = done["output"][0]
        if item["type"] == "function_call":
            yield event("response.output_item.added", output_index=0, item={**item, "arguments": "", "status": "in_progress"})
            for part in pieces(item["arguments"]):
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=0, delta=part)
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=0,
                        arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=0, item={**item, "content": [], "status": "in_progress"})
            yield event("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})
            for part in pieces(turn.text):
                yield event("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                            delta=part, logprobs=[])
            yield event("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                        text=turn.text, logprobs=[])
            yield event("response.content_part.done", item_id=item["id"], output_index=0, content_index=0,
                        part=item["content"][0])
        yield event("response.output_item.done", output_index=0, item=item)
        yield event("response.completed", response=done)

    # Anthropic Messages

    @staticmethod
    def _blocks(turn: standin.Turn, call_id) -> list[dict[str, Any]]:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": turn.text}]
        if turn.tool and not turn.react:
            blocks.append({"type": "tool_use", "id": f"toolu_{call_id}", "name": turn.tool, "input": turn.arguments})
        return blocks

    def _messages(self, doc, turn: standin.Turn, usage, call_id) -> dict[str, Any]:
        blocks = self._blocks(turn, call_id)
        return {"id": f"msg_{call_id}", "type": "message", "role": "assistant", "model": doc["model"], "content": blocks,
                "stop_reason": "tool_use" if len(blocks) > 1 else "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": usage[0], "output_tokens": usage[1]}}

    def _messages_stream(self, doc, turn: standin.Turn, usage, call_id):
        def event(kind: str, **fields) -> bytes:
            return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **fields}).encode() + b"\n\n"

        done = self._messages(doc, turn, usage, call_id)
        yield event("message_start", message={**done, "content": [], "stop_reason": None,
                                              "usage": {"input_tokens": usage[0], "output_tokens": 1}})
        for n, block in enumerate(done["content"]):
            if block["type"] == "text":
                yield event("content_block_start", index=n, content_block={"type": "text", "text": ""})
                for part in pieces(block["text"]):
                    yield event("content_block_delta", index=n, delta={"type": "text_delta", "text": part})
            else:
                yield event("content_block_start", index=n, content_block={**block, "input": {}})
                for part in pieces(json.dumps(block["input"])):
                    yield event("content_block_delta", index=n, delta={"type": "input_json_delta", "partial_json": part})
            yield event("content_block_stop", index=n)
        yield event("message_delta", delta={"stop_reason": done["stop_reason"], "stop_sequence": None},
                    usage={"output_tokens": usage[1]})
        yield event("message_stop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--dir", type=Path, default=Path(".custody/sample-model"))
    parser.add_argument("--plans", type=Path, help="a JSON object of more plans (task key -> steps)")
    parser.add_argument("--log", help="append one JSON line per request that reached the server")
    args = parser.parse_args()
    (cert, key), Handler.key = prepare(args.dir)
    Handler.plans = {**standin.CREW_PLANS, **(json.loads(args.plans.read_text()) if args.plans else {})}
    Handler.log_file = args.log or ""
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"sample model on https://127.0.0.1:{server.server_address[1]}", flush=True)
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    server.shutdown()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
