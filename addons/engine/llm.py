"""Model APIs as the gateway reads them: what a model call asks for, what a completion
says (its text, the tool calls it requests, its token usage), and which parts of each
masks apply to.

Two wire formats carry nearly every provider and local server: OpenAI's (Chat
Completions, `/v1/chat/completions`, and Responses, `/v1/responses`) and Anthropic's
(Messages, `/v1/messages`). A connection speaks one of them (`llm.api`); the endpoint is
known by the path's last segments, whatever prefix the provider puts before them. A body
of the other format is refused, not guessed at.

A completion asks for tools in two ways: function calls (`tool_calls`, `function_call`
items, `tool_use` blocks), and, for text-based agents, CrewAI's ReAct format: the text's
`Action:` and `Action Input:`, read the way CrewAI's own parser reads them
(crewai/agents/parser.py `parse`: a `Final Answer:` anywhere means no action; the input
runs to the end of the text). Arguments that are not JSON are kept as written and marked
`invalid`: no command can be proven to come from them.

Masks apply to what the conversation carries: message text, tool results, the arguments
of tool calls, system prompts and instructions, in the prompt going out and in the
completion coming back. Text that is a JSON document (tool results often are) is masked as
a document (field, key and detection masks); other text by detection, line by line (field
and key masks have nothing to hold on to in prose). What cannot be masked (an image, token
ids) refuses the body. Pure code (no mitmproxy).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from addons.engine.masks import Masker, MaskError, Report

OPENAI, ANTHROPIC = "openai", "anthropic"
"""The wire formats a connection may speak (`llm.api`)."""
CHAT, RESPONSES, MESSAGES = "chat", "responses", "messages"
EMBEDDINGS, COUNT_TOKENS, MODELS, OTHER = "embeddings", "count_tokens", "models", "other"
COMPLETIONS = (CHAT, RESPONSES, MESSAGES)
"""The endpoints that answer with a completion (whole, or as an event stream)."""
FORMAT = {CHAT: OPENAI, RESPONSES: OPENAI, EMBEDDINGS: OPENAI, MESSAGES: ANTHROPIC, COUNT_TOKENS: ANTHROPIC}
"""The wire format an endpoint belongs to (models and other endpoints: either)."""
API_NAMES = {CHAT: "OpenAI Chat Completions", RESPONSES: "OpenAI Responses", EMBEDDINGS: "OpenAI Embeddings",
             MESSAGES: "Anthropic Messages", COUNT_TOKENS: "Anthropic token counting"}
SUFFIXES = (("/chat/completions", CHAT), ("/responses", RESPONSES), ("/messages/count_tokens", COUNT_TOKENS),
            ("/messages", MESSAGES), ("/embeddings", EMBEDDINGS), ("/models", MODELS))

REQUEST_TYPE = "application/vnd.custody.llm-request+json; endpoint={}"
COMPLETION_TYPE = "application/vnd.custody.llm-completion+json; endpoint={}"
"""The content types under which the gateway hands model bodies to the masking workers."""
TYPE_PREFIX = "application/vnd.custody.llm-"

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
ANTHROPIC_BLOCKS = frozenset({"tool_use", "tool_result", "document", "thinking", "redacted_thinking"})
EXCERPT = 400


class Invalid(ValueError):
    """A request body that is not a request of its endpoint's API: refused, never forwarded."""


class Unreadable(ValueError):
    """A model server's answer that is not a completion of its API: withheld."""


def endpoint(method: str, path: str) -> str:
    """Which endpoint a (normalised) path is, by its last segments."""
    path = path.rstrip("/")
    for suffix, name in SUFFIXES:
        if path.endswith(suffix) and (name != MODELS or method.upper() == "GET"):
            return name
    if "/models/" in path and method.upper() == "GET":
        return MODELS
    return OTHER


@dataclass(frozen=True)
class Call:
    """What one model call asks for."""

    endpoint: str
    model: str
    max_tokens: int | None
    stream: bool
    tools: tuple[str, ...]
    messages: int
    last: str
    """The text of the conversation's last message (what the agent or a tool just said)."""

    def details(self) -> dict[str, Any]:
        return {"model": self.model, "max_tokens": self.max_tokens, "stream": self.stream, "tools": list(self.tools),
                "messages": self.messages, "last": self.last[:EXCERPT]}


def _positive(doc: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        if key in doc and doc[key] is not None:
            value = doc[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise Invalid(f"{key} must be a positive integer (got {json.dumps(value)[:40]})")
            return value
    return None


def _flag(doc: dict[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise Invalid(f"{key} must be true or false")
    return value


def _items(doc: dict[str, Any], key: str, required: bool = True) -> list:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise Invalid(f"{key} must be a non-empty list" if required else f"{key} must be a list")
    return value


def text_of(content: Any) -> str:
    """The text a message's content carries (string, or text parts and blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif "content" in part:
                    out.append(text_of(part["content"]))
                elif isinstance(part.get("output"), str):
                    out.append(part["output"])
        return "\n".join(t for t in out if t)
    return ""


def read_request(name: str, doc: Any) -> Call:
    """The model call a body of endpoint `name` asks for; Invalid says what is wrong."""
    if not isinstance(doc, dict):
        raise Invalid("the body is not a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise Invalid("model must be a non-empty string")
    reader = {CHAT: _chat_request, RESPONSES: _responses_request, MESSAGES: _messages_request,
              COUNT_TOKENS: _messages_request, EMBEDDINGS: _embeddings_request}[name]
    return reader(name, model, doc)


def _chat_request(name: str, model: str, doc: dict[str, Any]) -> Call:
    if "system" in doc:
        raise Invalid("a top-level system prompt is Anthropic Messages, not OpenAI Chat Completions")
    messages = _items(doc, "messages")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise Invalid(f"messages[{n}] needs a role of {', '.join(sorted(CHAT_ROLES))}")
        content = m.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in ANTHROPIC_BLOCKS
                                             for p in content):
            raise Invalid(f"messages[{n}] has Anthropic content blocks (tool_use, tool_result), not OpenAI parts")
        for c, call in enumerate(m.get("tool_calls") or []):
            arguments = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
            if not isinstance(arguments, str):
                raise Invalid(f"messages[{n}].tool_calls[{c}].function.arguments must be a string")
    tools = []
    for n, t in enumerate(_items(doc, "tools", required=False)):
        if isinstance(t, dict) and "input_schema" in t:
            raise Invalid(f"tools[{n}] has an input_schema: that is an Anthropic tool, not an OpenAI function")
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise Invalid(f"tools[{n}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}")
        tools.append(fn["name"])
    return Call(name, model, _positive(doc, "max_completion_tokens", "max_tokens"), _flag(doc, "stream"),
                tuple(tools), len(messages), text_of(messages[-1].get("content")))


def _responses_request(name: str, model: str, doc: dict[str, Any]) -> Call:
    if "messages" in doc:
        raise Invalid("the Responses API takes input, not messages (that is Chat Completions or Anthropic Messages)")
    given = doc.get("input")
    if isinstance(given, str):
        items: list = [{"role": "user", "content": given}]
    elif isinstance(given, list) and given:
        items = given
    else:
        raise Invalid("input must be a string or a non-empty list")
    if "instructions" in doc and not isinstance(doc["instructions"], (str, type(None))):
        raise Invalid("instructions must be a string")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise Invalid(f"input[{n}] must be an object")
        if item.get("type") == "function_call" and not isinstance(item.get("arguments"), str):
            raise Invalid(f"input[{n}].arguments must be a string")
    tools = []
    for n, t in enumerate(_items(doc, "tools", required=False)):
        label = t.get("name") or t.get("type") if isinstance(t, dict) else None
        if not isinstance(label, str):
            raise Invalid(f"tools[{n}] needs a name (a function) or a type (a built-in tool)")
        tools.append(label)
    last = items[-1]
    return Call(name, model, _positive(doc, "max_output_tokens"), _flag(doc, "stream"), tuple(tools), len(items),
                text_of(last.get("content")) or str(last.get("output") or ""))


def _messages_request(name: str, model: str, doc: dict[str, Any]) -> Call:
    messages = _items(doc, "messages")
    for n, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            raise Invalid(f"messages[{n}]: Anthropic Messages take the system prompt as `system`, not as a message")
        if role not in ("user", "assistant"):
            raise Invalid(f"messages[{n}] needs a role of user or assistant (a tool role is OpenAI's)")
        if "tool_calls" in m:
            raise Invalid(f"messages[{n}] has OpenAI tool_calls; Anthropic Messages use tool_use blocks")
    system = doc.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise Invalid("system must be a string or a list of blocks")
    tools = []
    for n, t in enumerate(_items(doc, "tools", required=False)):
        if isinstance(t, dict) and "function" in t:
            raise Invalid(f"tools[{n}] is an OpenAI function; Anthropic tools have a name and an input_schema")
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise Invalid(f"tools[{n}] needs a name")
        tools.append(t["name"])
    max_tokens = _positive(doc, "max_tokens")
    if max_tokens is None and name == MESSAGES:
        raise Invalid("max_tokens is required by Anthropic Messages")
    return Call(name, model, max_tokens, _flag(doc, "stream"), tuple(tools), len(messages),
                text_of(messages[-1].get("content")))


def _embeddings_request(name: str, model: str, doc: dict[str, Any]) -> Call:
    given = doc.get("input")
    if not isinstance(given, (str, list)) or not given:
        raise Invalid("input must be a string or a non-empty list")
    return Call(name, model, None, False, (), len(given) if isinstance(given, list) else 1,
                given if isinstance(given, str) else "")


# completions


@dataclass
class ToolCall:
    """A tool call a completion asks for: `arguments` parsed (JSON), or as written when
    they are not JSON (`invalid` then says so); `form` is function (a function call) or
    react (CrewAI's text format)."""

    id: str
    name: str
    arguments: Any
    text: str
    form: str = "function"
    invalid: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments, "form": self.form,
                **({"invalid": self.invalid} if self.invalid else {})}


def tool_call(cid: Any, name: Any, arguments: Any) -> ToolCall:
    """A function call as it came: arguments a JSON string (OpenAI) or an object (Anthropic)."""
    if not isinstance(name, str) or not name:
        raise Unreadable("a tool call without a function name")
    if isinstance(arguments, (dict, list)):
        return ToolCall(str(cid or ""), name, arguments, json.dumps(arguments, ensure_ascii=False))
    text = arguments if isinstance(arguments, str) else ""
    try:
        return ToolCall(str(cid or ""), name, json.loads(text) if text.strip() else {}, text)
    except ValueError:
        return ToolCall(str(cid or ""), name, text, text, invalid="the arguments are not JSON")


ACTION_INPUT = re.compile(r"Action\s*\d*\s*:\s*(.*?)\s*Action\s*\d*\s*Input\s*\d*\s*:\s*(.*)", re.DOTALL)
FINAL_ANSWER = "Final Answer:"


def react(text: str) -> ToolCall | None:
    """The action of a ReAct completion, as CrewAI's parser reads it (module docstring)."""
    if not text or FINAL_ANSWER in text:
        return None
    m = ACTION_INPUT.search(text)
    if m is None:
        return None
    tool = m.group(1).strip().strip("*").strip()
    given = m.group(2).strip().strip(" ").strip('"')
    try:
        arguments: Any = json.loads(given)
    except ValueError:
        arguments = given
    return ToolCall("", tool, arguments, f"Action: {tool}\nAction Input: {given}", form="react")


@dataclass
class Completion:
    """What a model answered: its text, the tool calls it asks for, its token usage."""

    model: str = ""
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    finish: str = ""
    complete: bool = True
    error: str = ""

    def with_react(self) -> Completion:
        """A text completion that asks for a tool in ReAct form gets that tool call."""
        if not self.tool_calls and (action := react(self.text)) is not None:
            self.tool_calls.append(action)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "tool_calls": [c.as_dict() for c in self.tool_calls],
                "usage": self.usage, "finish": self.finish, "complete": self.complete,
                **({"error": self.error} if self.error else {})}


def usage_of(raw: Any) -> dict[str, int]:
    """Token usage in one vocabulary (input_tokens, output_tokens) whichever API said it."""
    if not isinstance(raw, dict):
        return {}
    pairs = (("input_tokens", ("input_tokens", "prompt_tokens")), ("output_tokens", ("output_tokens", "completion_tokens")))
    out = {}
    for name, keys in pairs:
        value = next((raw[k] for k in keys if isinstance(raw.get(k), int)), None)
        if value is not None:
            out[name] = value
    return out


def read_completion(name: str, doc: Any) -> Completion:
    """The completion of a whole answer of endpoint `name`; Unreadable when it is not one."""
    if not isinstance(doc, dict):
        raise Unreadable("the answer is not a JSON object")
    reader = {CHAT: _chat_completion, RESPONSES: _responses_completion, MESSAGES: _messages_completion}[name]
    return reader(doc).with_react()


def _chat_completion(doc: dict[str, Any]) -> Completion:
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise Unreadable("no choices: not a Chat Completions answer")
    out = Completion(model=str(doc.get("model") or ""), usage=usage_of(doc.get("usage")),
                     finish=str(choices[0].get("finish_reason") or ""))
    for choice in choices:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise Unreadable("a choice without a message")
        if message.get("content") is not None and not isinstance(message["content"], str):
            raise Unreadable("a message's content is not text")
        if choice is choices[0]:
            out.text = message.get("content") or ""
        for call in message.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise Unreadable("a tool call without a function")
            out.tool_calls.append(tool_call(call.get("id"), fn.get("name"), fn.get("arguments")))
    return out


def _responses_completion(doc: dict[str, Any]) -> Completion:
    output = doc.get("output")
    if not isinstance(output, list) or not all(isinstance(i, dict) for i in output):
        raise Unreadable("no output: not a Responses answer")
    out = Completion(model=str(doc.get("model") or ""), usage=usage_of(doc.get("usage")),
                     finish=str(doc.get("status") or ""))
    texts = []
    for item in output:
        if item.get("type") == "message":
            texts += [p["text"] for p in item.get("content") or [] if isinstance(p, dict) and isinstance(p.get("text"), str)]
        elif item.get("type") == "function_call":
            out.tool_calls.append(tool_call(item.get("call_id") or item.get("id"), item.get("name"), item.get("arguments")))
    out.text = "".join(texts)
    return out


def _messages_completion(doc: dict[str, Any]) -> Completion:
    content = doc.get("content")
    if doc.get("type") != "message" or not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise Unreadable("no content blocks: not an Anthropic Messages answer")
    out = Completion(model=str(doc.get("model") or ""), usage=usage_of(doc.get("usage")),
                     finish=str(doc.get("stop_reason") or ""))
    out.text = "".join(b["text"] for b in content if b.get("type") == "text" and isinstance(b.get("text"), str))
    for block in content:
        if block.get("type") == "tool_use":
            out.tool_calls.append(tool_call(block.get("id"), block.get("name"), block.get("input", {})))
    return out


# masking


def masked_text(masker: Masker, text: str, report: Report) -> str:
    """Text the conversation carries: a JSON document in it masked as one, other text by
    detection line by line (see the module's docstring)."""
    masked = masker.json_text(text, report)
    return masker.lines(text, report) if masked is None else masked


def masked_arguments(masker: Masker, text: str, report: Report) -> str:
    """A tool call's arguments (a JSON string): masked as the document they are."""
    try:
        doc = json.loads(text)
    except ValueError:
        return masker.lines(text, report)
    before = report.masked
    masked = masker.document(doc, report)
    return text if report.masked == before else json.dumps(masked, ensure_ascii=False)


def _content(masker: Masker, content: Any, report: Report, where: str) -> Any:
    """A message's content: text, or a list of parts and blocks (text masked, tool uses'
    input and tool results' content masked, images and files refused)."""
    if isinstance(content, str):
        return masked_text(masker, content, report)
    if not isinstance(content, list):
        return content
    out = []
    for n, part in enumerate(content):
        if not isinstance(part, dict):
            out.append(masker.document(part, report))
            continue
        kind = part.get("type", "")
        if kind in ("image", "image_url", "input_image", "input_audio", "audio", "file", "input_file", "document"):
            raise MaskError(f"{where}[{n}] is {kind} data, which cannot be masked")
        part = dict(part)
        for key in ("text", "thinking", "output"):
            if isinstance(part.get(key), str):
                part[key] = masked_text(masker, part[key], report)
        if "input" in part:
            part["input"] = masker.document(part["input"], report)
        if "content" in part:
            part["content"] = _content(masker, part["content"], report, f"{where}[{n}].content")
        if isinstance(part.get("arguments"), str):
            part["arguments"] = masked_arguments(masker, part["arguments"], report)
        out.append(part)
    return out


def mask_request(name: str, masker: Masker, doc: Any, report: Report) -> Any:
    """The prompt of a model call as it may leave: what its messages, system prompt,
    instructions and tool results carry masked. An endpoint the gateway does not know is
    masked as a whole document."""
    if not isinstance(doc, dict):
        raise MaskError("the model call's body is not a JSON object and cannot be masked")
    out = dict(doc)
    if name in (CHAT, MESSAGES, COUNT_TOKENS):
        out["messages"] = [_message(masker, m, report, f"messages[{n}]") for n, m in enumerate(doc.get("messages") or [])]
        if "system" in doc:
            out["system"] = _content(masker, doc["system"], report, "system")
    elif name == RESPONSES:
        if isinstance(doc.get("instructions"), str):
            out["instructions"] = masked_text(masker, doc["instructions"], report)
        given = doc.get("input")
        out["input"] = (masked_text(masker, given, report) if isinstance(given, str) else
                        [_message(masker, m, report, f"input[{n}]") for n, m in enumerate(given or [])])
    elif name == EMBEDDINGS:
        given = doc.get("input")
        texts = [given] if isinstance(given, str) else given or []
        if not all(isinstance(t, str) for t in texts):
            raise MaskError("the input is token ids, which cannot be masked")
        masked = [masked_text(masker, t, report) for t in texts]
        out["input"] = masked[0] if isinstance(given, str) else masked
    else:
        out = masker.document(doc, report)
    return out


def _message(masker: Masker, m: Any, report: Report, where: str) -> Any:
    if not isinstance(m, dict):
        return masker.document(m, report)
    out = dict(m)
    for key in ("content", "summary"):  # summary: a reasoning item's (Responses)
        if key in m:
            out[key] = _content(masker, m[key], report, f"{where}.{key}")
    for key in ("output", "arguments", "refusal"):
        if isinstance(m.get(key), str):
            out[key] = (masked_arguments if key == "arguments" else masked_text)(masker, m[key], report)
    if isinstance(m.get("tool_calls"), list):
        out["tool_calls"] = [_function(masker, c, report) for c in m["tool_calls"]]
    return out


def _function(masker: Masker, call: Any, report: Report) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        fn["arguments"] = masked_arguments(masker, fn["arguments"], report)
    return {**call, "function": fn}


def mask_completion(name: str, masker: Masker, doc: Any, report: Report) -> Any:
    """A completion as the agent may have it: its text, refusals, reasoning and the
    arguments of its tool calls masked."""
    if not isinstance(doc, dict):
        return masker.document(doc, report)
    out = dict(doc)
    if name == CHAT and isinstance(doc.get("choices"), list):
        out["choices"] = [{**c, "message": _message(masker, c["message"], report, f"choices[{n}].message")}
                          if isinstance(c, dict) and isinstance(c.get("message"), dict) else c
                          for n, c in enumerate(doc["choices"])]
    elif name == RESPONSES and isinstance(doc.get("output"), list):
        out["output"] = [_message(masker, item, report, f"output[{n}]") for n, item in enumerate(doc["output"])]
        for key in ("instructions", "output_text"):
            if isinstance(doc.get(key), str):
                out[key] = masked_text(masker, doc[key], report)
    elif name == MESSAGES and isinstance(doc.get("content"), list):
        out["content"] = _content(masker, doc["content"], report, "content")
    else:
        out = masker.document(doc, report)
    return out


def content_type(kind: str, name: str) -> str:
    """The masking workers' content type for a model body (`request` or `completion`)."""
    return (REQUEST_TYPE if kind == "request" else COMPLETION_TYPE).format(name)


def mask_body(masker: Masker, content: bytes, kind_type: str) -> tuple[bytes, Report]:
    """A model body masked in a worker: the request or completion of the endpoint its
    content type names."""
    report = Report()
    name = kind_type.rpartition("endpoint=")[2]
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise MaskError("the model body is not JSON and cannot be masked") from None
    masked = (mask_request if kind_type.startswith(REQUEST_TYPE.split(";")[0]) else mask_completion)(
        name, masker, doc, report)
    if not report.masked:
        return content, report
    return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode(), report
