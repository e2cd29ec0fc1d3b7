"""The model APIs on their own (addons/engine/llm.py, llmstream.py, addons/classifiers/llm.py):
what a model call asks for, what a completion says, how event streams are read and masked,
and the llm connection's configuration. The bodies are the providers' documented shapes
(platform.openai.com/docs/api-reference: chat, responses; docs.anthropic.com/en/api:
messages, messages-streaming)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from addons.classifiers import llm as classifier
from addons.engine import config, llm, llmstream
from addons.engine.detectors import Detector
from addons.engine.masks import Masker, MaskError, Report, parse_all
from addons.engine.model import Request
from addons.engine.sse import Event, EventStream, StreamError

TOKEN = "ghp_" + "Ab3Cd4Ef5Gh6Ij7Kl8Mn9Op0Qr1St2Uv3Wx4Y"
EMAIL = "dana.lee@example.com"


@pytest.fixture(scope="module")
def masker():
    return Masker(parse_all(["secrets", "pii"]), Detector(), b"key")


def classify(path: str, body, method: str = "POST"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return classifier.from_request("models", Request(method, path, (), content))


# requests


@pytest.mark.parametrize("method, path, endpoint", [
    ("POST", "/v1/chat/completions", "chat"), ("POST", "/openai/deployments/x/chat/completions/", "chat"),
    ("POST", "/v1/responses", "responses"), ("POST", "/v1/messages", "messages"),
    ("POST", "/v1/messages/count_tokens", "count_tokens"), ("POST", "/v1/embeddings", "embeddings"),
    ("GET", "/v1/models", "models"), ("GET", "/v1/models/gpt-4o", "models"), ("POST", "/v1/models", "other"),
    ("GET", "/v1/responses/resp_1", "other"), ("POST", "/v1/files", "other"),
])
def test_the_endpoint_is_known_by_the_paths_last_segments(method, path, endpoint):
    assert llm.endpoint(method, path) == endpoint


@pytest.mark.parametrize("path, body, action, details", [
    ("/v1/chat/completions", {"model": "gpt-4o", "max_completion_tokens": 50, "stream": True,
                              "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "sql"}}]},
     "exec", {"model": "gpt-4o", "max_tokens": 50, "stream": True, "tools": ["sql"], "messages": 2, "last": "hi"}),
    ("/v1/responses", {"model": "o4", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}],
                       "max_output_tokens": 9, "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]},
     "exec", {"model": "o4", "max_tokens": 9, "stream": False, "tools": ["f", "web_search"], "messages": 1, "last": "a"}),
    ("/v1/messages", {"model": "claude-x", "max_tokens": 64, "system": "s", "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "rows: 3"}]}],
        "tools": [{"name": "sql", "input_schema": {}}]},
     "exec", {"model": "claude-x", "max_tokens": 64, "stream": False, "tools": ["sql"], "messages": 1,
              "last": "rows: 3"}),
    ("/v1/messages/count_tokens", {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}, "read",
     {"model": "claude-x", "max_tokens": None}),
    ("/v1/embeddings", {"model": "emb", "input": ["a", "b"]}, "exec", {"model": "emb", "messages": 2}),
])
def test_a_model_call_is_classified_by_what_it_asks_for(path, body, action, details):
    op = classify(path, body)
    assert (op.protocol, op.action, op.resource) == ("llm", action, body["model"])
    assert {k: op.details[k] for k in details} == details


@pytest.mark.parametrize("path, body, reason", [
    ("/v1/chat/completions", b"[1,", "the body is not one JSON document"),
    ("/v1/chat/completions", [1], "the body is not a JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model must be a non-empty string"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0] needs a role"),
    ("/v1/chat/completions", {"model": "m", "system": "s", "messages": [{"role": "user", "content": "x"}]},
     "a top-level system prompt is Anthropic Messages"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": "tool_use"}]}]},
     "messages[0] has Anthropic content blocks"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"name": "sql", "input_schema": {}}]}, "tools[0] has an input_schema"),
    ("/v1/chat/completions", {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens must be a positive integer (got 0)"),
    ("/v1/chat/completions", {"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
     "max_tokens must be a positive integer (got true)"),
    ("/v1/chat/completions", {"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
     "stream must be true or false"),
    ("/v1/responses", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "takes input, not messages"),
    ("/v1/responses", {"model": "m", "input": []}, "input must be a string or a non-empty list"),
    ("/v1/responses", {"model": "m", "input": [{"type": "function_call", "arguments": {}}]},
     "input[0].arguments must be a string"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "take the system prompt as `system`"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]},
     "a tool role is OpenAI's"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                      "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0] is an OpenAI function"),
    ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens is required"),
    ("/v1/embeddings", {"model": "m"}, "input must be a string or a non-empty list"),
])
def test_a_body_that_is_not_its_endpoints_request_is_invalid(path, body, reason):
    op = classify(path, body)
    assert op.action == "unknown" and reason in op.details["invalid"]


def test_other_endpoints_are_classified_as_http_and_keep_the_endpoint():
    op = classify("/v1/files/file-1", b"", method="DELETE")
    assert (op.protocol, op.action, op.details["endpoint"]) == ("llm", "delete", "other")


# completions


CHAT = {"id": "c", "object": "chat.completion", "model": "gpt-4o", "usage": {"prompt_tokens": 9, "completion_tokens": 4},
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "call_1", "type": "function",
                                     "function": {"name": "sql", "arguments": "{\"query\": \"SELECT 1\"}"}}]}}]}
RESPONSES = {"id": "r", "object": "response", "model": "o4", "status": "completed",
             "usage": {"input_tokens": 3, "output_tokens": 2},
             "output": [{"type": "reasoning", "summary": []},
                        {"type": "function_call", "call_id": "fc_1", "name": "sql", "arguments": "{\"query\": \"SELECT 1\"}"},
                        {"type": "message", "content": [{"type": "output_text", "text": "done"}]}]}
MESSAGES = {"id": "m", "type": "message", "model": "claude-x", "stop_reason": "tool_use",
            "usage": {"input_tokens": 5, "output_tokens": 6},
            "content": [{"type": "text", "text": "I will"}, {"type": "tool_use", "id": "toolu_1", "name": "sql",
                                                              "input": {"query": "SELECT 1"}}]}


@pytest.mark.parametrize("endpoint, doc, text, calls, usage", [
    ("chat", CHAT, "", [("call_1", "sql", {"query": "SELECT 1"})], {"input_tokens": 9, "output_tokens": 4}),
    ("responses", RESPONSES, "done", [("fc_1", "sql", {"query": "SELECT 1"})], {"input_tokens": 3, "output_tokens": 2}),
    ("messages", MESSAGES, "I will", [("toolu_1", "sql", {"query": "SELECT 1"})], {"input_tokens": 5, "output_tokens": 6}),
])
def test_a_completion_says_its_text_its_tool_calls_and_its_usage(endpoint, doc, text, calls, usage):
    c = llm.read_completion(endpoint, doc)
    assert (c.text, [(t.id, t.name, t.arguments) for t in c.tool_calls], c.usage) == (text, calls, usage)


@pytest.mark.parametrize("endpoint, doc, reason", [
    ("chat", [], "the answer is not a JSON object"),
    ("chat", {"object": "chat.completion"}, "no choices"),
    ("chat", {"choices": [{"index": 0}]}, "a choice without a message"),
    ("chat", {"choices": [{"message": {"content": [1]}}]}, "a message's content is not text"),
    ("chat", {"choices": [{"message": {"tool_calls": [{"id": "x"}]}}]}, "a tool call without a function"),
    ("chat", {"choices": [{"message": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]},
     "a tool call without a function name"),
    ("responses", {"output": "text"}, "no output"),
    ("messages", {"type": "error", "content": []}, "no content blocks"),
    ("messages", CHAT, "no content blocks"),  # an OpenAI answer on an Anthropic connection
])
def test_an_answer_that_is_not_a_completion_is_unreadable(endpoint, doc, reason):
    with pytest.raises(llm.Unreadable, match=reason):
        llm.read_completion(endpoint, doc)


def test_tool_call_arguments_that_are_not_json_are_kept_as_written_and_marked():
    doc = json.loads(json.dumps(CHAT))
    doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "SELECT 1 {"
    call = llm.read_completion("chat", doc).tool_calls[0]
    assert (call.arguments, call.invalid) == ("SELECT 1 {", "the arguments are not JSON")


@pytest.mark.parametrize("text, tool, arguments", [
    ('Thought: t\nAction: sql\nAction Input: {"query": "SELECT 1"}', "sql", {"query": "SELECT 1"}),
    ("Thought: t\nAction: **sql**\nAction Input: \"SELECT 1\"", "sql", "SELECT 1"),  # CrewAI strips * and quotes
    ("Action 1: kubectl\nAction Input 1: get pods -n shop", "kubectl", "get pods -n shop"),
    ('Action: sql\nAction Input: {"query": "x"}\nObservation: made up', "sql", '{"query": "x"}\nObservation: made up'),
    ("Thought: done\nFinal Answer: 42", None, None),
    ('Action: sql\nAction Input: {"q": 1}\nFinal Answer: both', None, None),  # CrewAI takes the final answer
    ("just text", None, None),
])
def test_a_react_completion_asks_for_the_tool_crewai_would_run(text, tool, arguments):
    call = llm.react(text)
    assert (call.name, call.arguments, call.form) == (tool, arguments, "react") if tool else call is None


# streams


def run(endpoint: str, events: list[Event], masker=None, cut: bytes = b"") -> tuple[bytes, llm.Completion]:
    reader = llmstream.reader(endpoint, masker, Report(), 4096)
    stream = EventStream(reader, 4096, keep=1 << 20)
    out = b"".join(stream(e.encode()) for e in events)
    out += stream(cut) + stream(b"")
    return out, reader.finished()


def ev(kind: str | None, doc) -> Event:
    data = doc if isinstance(doc, str) else json.dumps(doc)
    return Event(([("event", kind)] if kind else []) + [("data", data)])


def chat_chunk(delta: dict, finish=None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


SPLIT = ["Mail dana.le", "e@example.c", "om now\nand ", TOKEN[:10], TOKEN[10:], " soon"]
CHAT_EVENTS = [ev(None, chat_chunk({"role": "assistant", "content": ""})),
               *[ev(None, chat_chunk({"content": p})) for p in SPLIT],
               ev(None, chat_chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                                    "function": {"name": "mail", "arguments": ""}}]})),
               ev(None, chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"to": "dana.le'}}]})),
               ev(None, chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'e@example.com"}'}}]})),
               ev(None, chat_chunk({}, "tool_calls")),
               ev(None, {"id": "c", "object": "chat.completion.chunk", "choices": [],
                         "usage": {"prompt_tokens": 7, "completion_tokens": 5}}),
               ev(None, "[DONE]")]
MESSAGES_EVENTS = [ev("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {
                       "input_tokens": 7}}}),
                   ev("content_block_start", {"type": "content_block_start", "index": 0,
                                              "content_block": {"type": "text", "text": ""}}),
                   *[ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": p}}) for p in SPLIT],
                   ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ev("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                       "type": "tool_use", "id": "toolu_9", "name": "mail", "input": {}}}),
                   *[ev("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                       "type": "input_json_delta", "partial_json": p}}) for p in ('{"to": "dana.le', 'e@example.com"}')],
                   ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
                   ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
                                        "usage": {"output_tokens": 5}}),
                   ev("message_stop", {"type": "message_stop"})]
RESPONSES_EVENTS = [ev("response.created", {"type": "response.created", "response": {"model": "o4", "output": []}}),
                    *[ev("response.output_text.delta", {"type": "response.output_text.delta", "output_index": 0,
                                                        "content_index": 0, "delta": p}) for p in SPLIT],
                    ev("response.output_text.done", {"type": "response.output_text.done", "output_index": 0,
                                                     "content_index": 0, "text": "".join(SPLIT)}),
                    ev("response.output_item.added", {"type": "response.output_item.added", "output_index": 1, "item": {
                        "type": "function_call", "call_id": "fc_9", "name": "mail", "arguments": ""}}),
                    *[ev("response.function_call_arguments.delta", {"type": "response.function_call_arguments.delta",
                                                                    "output_index": 1, "delta": p})
                      for p in ('{"to": "dana.le', 'e@example.com"}')],
                    ev("response.function_call_arguments.done", {"type": "response.function_call_arguments.done",
                                                                 "output_index": 1, "arguments": '{"to": "x"}'}),
                    ev("response.completed", {"type": "response.completed", "response": {
                        "model": "o4", "status": "completed", "usage": {"input_tokens": 7, "output_tokens": 5},
                        "output": [{"type": "message", "content": [{"type": "output_text", "text": "".join(SPLIT)}]},
                                   {"type": "function_call", "call_id": "fc_9", "name": "mail",
                                    "arguments": '{"to": "dana.lee@example.com"}'}]}})]
STREAMS = [("chat", CHAT_EVENTS, "call_9"), ("messages", MESSAGES_EVENTS, "toolu_9"),
           ("responses", RESPONSES_EVENTS, "fc_9")]


@pytest.mark.parametrize("endpoint, events, call", STREAMS, ids=[s[0] for s in STREAMS])
def test_a_stream_is_read_into_its_completion_and_passes_as_it_came_without_masks(endpoint, events, call):
    out, done = run(endpoint, events)
    assert out == b"".join(e.encode() for e in events)
    assert done.complete and done.text == "".join(SPLIT) and done.usage == {"input_tokens": 7, "output_tokens": 5}
    assert [(c.id, c.name, c.arguments) for c in done.tool_calls] == [(call, "mail", {"to": EMAIL})]


@pytest.mark.parametrize("endpoint, events, call", STREAMS, ids=[s[0] for s in STREAMS])
def test_a_stream_is_masked_a_line_and_a_whole_tool_call_at_a_time(masker, endpoint, events, call):
    out, done = run(endpoint, events, masker)
    assert EMAIL.encode() not in out and TOKEN[:10].encode() not in out and b"dana.le" not in out
    assert done.text == "Mail [EMAIL_ADDRESS] now\nand [GITHUB_TOKEN] soon"
    assert [(c.id, c.arguments) for c in done.tool_calls] == [(call, {"to": "[EMAIL_ADDRESS]"})]
    texts, arguments = [], []  # what the agent's SDK would put together from the deltas
    for raw in out.split(b"\n\n"):
        data = next((line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")), b"")
        if not data or data == b"[DONE]":
            continue
        doc = json.loads(data)
        if endpoint == "chat":
            for choice in doc["choices"]:
                texts.append(choice["delta"].get("content") or "")
                arguments += [t["function"].get("arguments", "") for t in choice["delta"].get("tool_calls", [])]
        elif endpoint == "messages" and doc["type"] == "content_block_delta":
            texts.append(doc["delta"].get("text", ""))
            arguments.append(doc["delta"].get("partial_json", ""))
        elif endpoint == "responses" and doc["type"].endswith(".delta"):
            (texts if "output_text" in doc["type"] else arguments).append(doc["delta"])
    assert "".join(texts) == done.text and json.loads("".join(arguments)) == {"to": "[EMAIL_ADDRESS]"}


@pytest.mark.parametrize("endpoint, events, call", STREAMS, ids=[s[0] for s in STREAMS])
def test_a_stream_that_ends_before_its_last_event_is_incomplete_and_asks_for_nothing(endpoint, events, call):
    _, done = run(endpoint, events[:-1], cut=b'data: {"partial')
    assert not done.complete and done.tool_calls  # read, but not taken as asked (addons/modelguard.py)


@pytest.mark.parametrize("data, error", [
    ("not json", "an event of the stream is not JSON"),
    ("[1, 2]", "a chunk of the stream is not a JSON object"),
    (json.dumps({"choices": ["x"]}), "a choice of the stream is not a JSON object"),
])
def test_a_stream_that_is_not_a_completion_stream_is_cut_off(data, error):
    reader = llmstream.reader("chat", None, Report(), 4096)
    with pytest.raises(StreamError, match=error):
        reader(ev(None, data))


def test_a_line_longer_than_a_record_may_be_is_not_held_forever(masker):
    reader = llmstream.reader("chat", masker, Report(), 64)
    with pytest.raises(StreamError, match="a line of the completion is longer than 64 bytes"):
        for _ in range(10):
            reader(ev(None, chat_chunk({"content": "x" * 10})))


@pytest.mark.parametrize("endpoint", ["chat", "messages", "responses"])
def test_the_error_event_is_in_the_apis_own_format(endpoint):
    raw = llmstream.reader(endpoint, None, Report(), 64).error_event("the stream was cut off")
    event = Event.parse(raw.rstrip(b"\n"))
    doc = json.loads(event.data)
    said = doc["error"]["message"] if endpoint != "responses" else doc["message"]
    assert said == "custody: the stream was cut off"
    assert event.type == ("message" if endpoint == "chat" else "error")


# masking prompts and completions


@pytest.mark.parametrize("endpoint, body, path", [
    ("chat", {"messages": [{"role": "user", "content": f"mail {EMAIL}"}]}, lambda d: d["messages"][0]["content"]),
    ("chat", {"messages": [{"role": "tool", "content": json.dumps({"key": TOKEN})}]},
     lambda d: json.loads(d["messages"][0]["content"])["key"]),
    ("chat", {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
        "name": "f", "arguments": json.dumps({"to": EMAIL})}}]}]},
     lambda d: json.loads(d["messages"][0]["tool_calls"][0]["function"]["arguments"])["to"]),
    ("messages", {"system": f"key {TOKEN}", "messages": []}, lambda d: d["system"]),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [
        {"type": "text", "text": EMAIL}]}]}]}, lambda d: d["messages"][0]["content"][0]["content"][0]["text"]),
    ("messages", {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {"to": EMAIL}}]}]},
     lambda d: d["messages"][0]["content"][0]["input"]["to"]),
    ("responses", {"instructions": f"key {TOKEN}", "input": "x"}, lambda d: d["instructions"]),
    ("responses", {"input": [{"type": "function_call_output", "output": EMAIL}]}, lambda d: d["input"][0]["output"]),
    ("embeddings", {"input": [f"a {EMAIL}"]}, lambda d: d["input"][0]),
    ("other", {"anything": {"deep": EMAIL}}, lambda d: d["anything"]["deep"]),
])
def test_a_prompt_is_masked_wherever_the_conversation_carries_it(masker, endpoint, body, path):
    content, report = llm.mask_body(masker, json.dumps({"model": "m", **body}).encode(),
                                    llm.content_type("request", endpoint))
    masked = path(json.loads(content))
    assert EMAIL not in masked and TOKEN not in masked and report.masked >= 1


@pytest.mark.parametrize("endpoint, body, reason", [
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0] is image_url data"),
    ("messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "messages[0].content[0] is image data"),
    ("embeddings", {"input": [[1, 2, 3]]}, "the input is token ids"),
])
def test_a_prompt_that_cannot_be_masked_is_refused(masker, endpoint, body, reason):
    with pytest.raises(MaskError, match=re.escape(reason)):
        llm.mask_body(masker, json.dumps({"model": "m", **body}).encode(), llm.content_type("request", endpoint))


@pytest.mark.parametrize("endpoint, doc", [("chat", CHAT), ("responses", RESPONSES), ("messages", MESSAGES)])
def test_a_completions_text_and_tool_arguments_are_masked(masker, endpoint, doc):
    planted = json.loads(json.dumps(doc).replace("SELECT 1", EMAIL).replace("I will", TOKEN).replace("done", TOKEN))
    content, _ = llm.mask_body(masker, json.dumps(planted).encode(), llm.content_type("completion", endpoint))
    assert EMAIL not in content.decode() and TOKEN not in content.decode()
    assert llm.read_completion(endpoint, json.loads(content)).tool_calls[0].arguments == {"query": "[EMAIL_ADDRESS]"}


# the connection


@pytest.mark.parametrize("llm_block, extra, error", [
    (None, {}, "connections[0]: an llm connection needs llm.api (openai or anthropic)"),
    ({"api": "gemini"}, {}, "'gemini' is not one of ['openai', 'anthropic']"),
    ({"api": "openai"}, {"upstream": "ssh://h"}, "connections[0].upstream"),
    ({"api": "openai"}, {"upstream": None}, "an llm connection needs the model API's http(s)://host:port"),
])
def test_an_llm_connection_is_configured_or_refused_precisely(tmp_path: Path, llm_block, extra, error):
    raw = {"name": "m", "kind": "llm", "hosts": ["m.test"], "upstream": "https://api.example", **extra}
    raw = {k: v for k, v in raw.items() if v is not None}
    if llm_block is not None:
        raw["llm"] = llm_block
    with pytest.raises(config.ConfigError, match=re.escape(error)):
        config.parse({"connections": [raw], "rules": "r", "store": {"path": "a.db"}}, str(tmp_path / "c.yaml"))


def test_an_llm_connection_holds_the_providers_key_and_takes_the_agents_token_as_its_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider")
    raw = {"name": "m", "kind": "llm", "hosts": ["m.test"], "upstream": "https://api.example",
           "credential": {"type": "bearer", "secret": "env:PROVIDER_KEY"}, "llm": {"api": "anthropic", "remember": "5m"}}
    conn = config.parse({"connections": [raw], "rules": "r", "store": {"path": "a.db"}},
                        str(tmp_path / "c.yaml")).connections[0]
    assert (conn.llm.api, conn.llm.remember, conn.bearer_is_gateway) == ("anthropic", 300.0, True)
    assert conn.credential.value == "Bearer sk-provider" and conn.upstream.port == 443
    with pytest.raises(config.ConfigError, match=r"connections\[0\].llm: only for llm connections"):
        config.parse({"connections": [{**raw, "kind": "http"}], "rules": "r", "store": {"path": "a.db"}},
                     str(tmp_path / "c.yaml"))
