"""MCP over JSON-RPC 2.0, as the gateway reads it: messages, tool definitions and their
fingerprints, the refusals it answers with, and which parts of a message masks apply to.

Pure code (no mitmproxy): the classifier, the chain's MCP addon, the stdio terminal, the
masking workers and the evidence tools share it. The protocol is the Model Context
Protocol (modelcontextprotocol.io/specification): requests carry an id and a method, a
notification a method and no id, a response an id and exactly one of result or error.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from addons.engine.errors import GATEWAY_FAILURES, Error
from addons.engine.masks import Masker, MaskError, Report
from addons.engine.model import Operation, canonical_json

JSONRPC = "2.0"
MCP_MESSAGES = "application/vnd.custody.mcp+json"
"""The content type under which the gateway hands MCP bodies to the masking workers."""

TOOL_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
"""Tool names as the specification allows them (SEP-986): no spaces, no glob characters."""
SESSION_ID = re.compile(r"[\x21-\x7e]{1,256}\Z")
"""Mcp-Session-Id: visible ASCII only (the Streamable HTTP transport)."""

# JSON-RPC 2.0 error codes, and the gateway's own (the -32000..-32099 server range)
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603
REFUSED = -32001  # a decision refused the message (policy, approvers, a changed tool, a foreign session)
PENDING = -32002  # held for review and not decided in time: re-send once approved

LISTEN = "custody/listen"  # GET: the event stream of the session (or the older HTTP+SSE transport's stream)
CLOSE = "custody/close"  # DELETE: the end of the session

READ, WRITE, DELETE, EXEC, ADMIN, UNKNOWN = "read", "write", "delete", "exec", "admin", "unknown"
CLIENT_METHODS = {
    "initialize": READ, "ping": READ, "tools/list": READ, "tools/call": EXEC,
    "resources/list": READ, "resources/templates/list": READ, "resources/read": READ,
    "resources/subscribe": READ, "resources/unsubscribe": READ, "prompts/list": READ, "prompts/get": READ,
    "completion/complete": READ, "logging/setLevel": WRITE,
    "tasks/get": READ, "tasks/result": READ, "tasks/list": READ, "tasks/cancel": WRITE,
    LISTEN: READ, CLOSE: READ,
}
SERVER_METHODS = {"sampling/createMessage": EXEC, "elicitation/create": EXEC, "roots/list": READ, "ping": READ}
"""Requests a server sends the client (on an event stream): refused unless a rule names them."""
SAMPLING, ELICITATION = "sampling/createMessage", "elicitation/create"
CLIENT_CAPABILITIES = {SAMPLING: "sampling", ELICITATION: "elicitation", "roots/list": "roots"}
RISK = {READ: 10, WRITE: 40, DELETE: 70, EXEC: 90, ADMIN: 90, UNKNOWN: 90}
UNCONFIGURED_TOOL_RISK = 100
"""A tool the configuration does not name: exec, and the riskiest thing an agent can do."""

MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "result", "error"})
FINGERPRINTED = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")


class Invalid(ValueError):
    """A message that is not valid JSON-RPC 2.0, or not valid MCP: refused, never forwarded."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Message:
    """One JSON-RPC message: kind `request`, `notification` or `response`."""

    kind: str
    id: str | int | None
    method: str
    params: dict[str, Any] | None
    raw: dict[str, Any]


def request_id(raw: Any) -> str | int | None:
    """The message's id if it is one a response could carry (a string or an integer)."""
    value = raw.get("id") if isinstance(raw, dict) else None
    return value if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)) else None


def id_key(value: str | int | None) -> str:
    """Ids as keys: 1 and "1" are different ids."""
    return json.dumps(value)


def message(raw: Any) -> Message:
    """Read one JSON-RPC message; Invalid says precisely what is wrong with it."""
    if not isinstance(raw, dict):
        raise Invalid(INVALID_REQUEST, "a JSON-RPC message must be a JSON object")
    if raw.get("jsonrpc") != JSONRPC:
        raise Invalid(INVALID_REQUEST, 'a JSON-RPC 2.0 message must say "jsonrpc": "2.0"')
    if extra := sorted(set(raw) - MEMBERS):
        raise Invalid(INVALID_REQUEST, f"unknown member(s) {', '.join(extra)}")
    has_id, rid = "id" in raw, request_id(raw)
    if has_id and rid is None:
        raise Invalid(INVALID_REQUEST, "the id must be a string or an integer")
    if "method" in raw:
        if "result" in raw or "error" in raw:
            raise Invalid(INVALID_REQUEST, "a message cannot be both a request and a response")
        method = raw["method"]
        if not isinstance(method, str) or not method:
            raise Invalid(INVALID_REQUEST, "the method must be a non-empty string")
        params = raw.get("params")
        if "params" in raw and not isinstance(params, dict):
            raise Invalid(INVALID_REQUEST, "params must be an object")
        if method.startswith("notifications/"):
            if has_id:
                raise Invalid(INVALID_REQUEST, f"{method} is a notification and must not carry an id")
            return Message("notification", None, method, params, raw)
        if not has_id:
            raise Invalid(INVALID_REQUEST, f"{method} is a request and needs an id")
        return Message("request", rid, method, params, raw)
    if "result" in raw or "error" in raw:
        if "result" in raw and "error" in raw:
            raise Invalid(INVALID_REQUEST, "a response has a result or an error, not both")
        if rid is None:
            raise Invalid(INVALID_REQUEST, "a response needs the id of the request it answers")
        error = raw.get("error")
        if "error" in raw and not (isinstance(error, dict) and isinstance(error.get("code"), int)
                                   and isinstance(error.get("message"), str)):
            raise Invalid(INVALID_REQUEST, "an error needs an integer code and a string message")
        return Message("response", rid, "", None, raw)
    raise Invalid(INVALID_REQUEST, "neither a request, a notification nor a response")


def check_params(msg: Message) -> None:
    """The parameters the gateway decides on must be what the specification says they are."""
    params = msg.params or {}
    if msg.method == "tools/call":
        name = params.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise Invalid(INVALID_PARAMS, f"tools/call needs a tool name of 1-128 letters, digits, '_', '-' or '.' "
                                          f"(got {json.dumps(name)[:140]})")
        if "arguments" in params and not isinstance(params["arguments"], dict):
            raise Invalid(INVALID_PARAMS, "tools/call arguments must be an object")
    elif msg.method == "resources/read" and not isinstance(params.get("uri"), str):
        raise Invalid(INVALID_PARAMS, "resources/read needs a uri")
    elif msg.method == "prompts/get" and not isinstance(params.get("name"), str):
        raise Invalid(INVALID_PARAMS, "prompts/get needs a name")


# tool definitions


def tool_fingerprint(tool: dict[str, Any]) -> str:
    """SHA-256 of what a model reads and what the gateway decides on: the tool's name, title,
    description, input and output schema and annotations (canonical JSON)."""
    return hashlib.sha256(canonical_json({k: tool[k] for k in FINGERPRINTED if k in tool}).encode()).hexdigest()


def annotated_action(annotations: dict[str, Any] | None) -> str:
    """The action a server's annotations claim (only used where configuration trusts them):
    read-only is read, destructive is delete, anything else that may change state is write."""
    annotations = annotations or {}
    if annotations.get("readOnlyHint") is True:
        return READ
    return DELETE if annotations.get("destructiveHint", True) is not False else WRITE


def call_identity(op: Operation) -> bytes:
    """What an approval of an MCP message is bound to: each message's method, target and
    parameters (tool arguments), without what changes on every send (the JSON-RPC id, the
    session, a progress token): a re-sent identical call matches, any other call does not."""
    parts = op.parts or (op,)
    return canonical_json([[p.details.get("method", ""), p.resource, _without_progress(p.payload)]
                           for p in parts]).encode()


def _without_progress(payload: Any) -> Any:
    if isinstance(payload, dict) and isinstance(payload.get("_meta"), dict) and "progressToken" in payload["_meta"]:
        meta = {k: v for k, v in payload["_meta"].items() if k != "progressToken"}
        return {**{k: v for k, v in payload.items() if k != "_meta"}, **({"_meta": meta} if meta else {})}
    return payload


# refusals


def error_object(code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, **({"data": data} if data is not None else {})}


def answer(rid: str | int | None, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": rid, "error": error}


def asks(op: Operation) -> bool:
    """Is this message one to answer, by its id: a request, or something invalid that has a
    method and an id (it meant to be one)? Notifications and responses are never answered."""
    d = op.details
    return d.get("id") is not None and d.get("kind") != "response" and bool(d.get("method"))


KEEP_STATUS = frozenset({Error.UNAUTHENTICATED, Error.UNKNOWN_SESSION})
"""Refusals whose HTTP status MCP clients act on (authenticate; start a new session)."""


RESUME_PREFIX = "custody-approval-"
"""The event id of a held call's event stream: the client resumes it with Last-Event-ID."""
RETRY_MS = 500
AS_STREAM = "custody.mcp.stream"
"""flow.metadata: this client reads its answer as an event stream (it resumed one)."""


def refusal(op: Operation | None, status: int, error: str, custody: dict[str, Any],
            stream: bool = False) -> tuple[int, bytes, str]:
    """A refusal as JSON-RPC: an error response for each request of the message (or of the
    batch) with its id, so MCP clients surface it to the agent, over HTTP 200 as the
    Streamable HTTP transport expects. `custody` (decision, error, reason, rules, event id,
    approval) is each error's data; its message names the reason and the audit event. A
    message without requests (notifications, responses) has no id to answer: one error
    with id null, with the refusal's own HTTP status.

    A hold whose keep-alive window ended (`custody["resume"]`) is an event stream of one
    event that has only an id: the client comes back for the answer with that id in
    Last-Event-ID (the transport's resumption), and waits on. A client that came back
    (`stream`) reads everything as an event stream. Returns status, body, content type."""
    if custody.get("resume"):
        body = (f": custody: {custody['reason']} (approval {custody['resume']}; audit event "
                f"{custody.get('event_id', '')})\nid: {RESUME_PREFIX}{custody['resume']}\nretry: {RETRY_MS}\ndata: \n\n")
        return 200, body.encode(), "text/event-stream"
    code = PENDING if error == Error.APPROVAL_PENDING else INTERNAL_ERROR if error in GATEWAY_FAILURES else REFUSED
    where = [f"rules: {', '.join(custody['rules'])}"] if custody.get("rules") else []
    where.append(f"audit event {custody.get('event_id', '')}")
    if custody.get("approval_id"):
        where.append(f"approval {custody['approval_id']}")
    suffix = f" ({'; '.join(where)})"
    parts = (op.parts or (op,)) if op is not None else ()
    answers = [answer(p.details["id"], error_object(p.details.get("jsonrpc_code") or code,
                                                    f"custody: {p.details.get('invalid') or custody['reason']}{suffix}",
                                                    custody))
               for p in parts if asks(p)]
    if stream:  # the client replaces the id with its request's; an event stream cannot carry a null one
        events = answers or [answer("custody", error_object(code, f"custody: {custody['reason']}{suffix}", custody))]
        return 200, b"".join(sse_message(m) for m in events), "text/event-stream"
    if not answers:
        invalid = op.details.get("invalid") if op is not None else None
        body = answer(None, error_object((op.details.get("jsonrpc_code") if op is not None else None) or code,
                                         f"custody: {invalid or custody['reason']}{suffix}", custody))
        return (status if status >= 400 else 400), json.dumps(body).encode(), "application/json"
    batch = op is not None and op.details.get("batch", False)
    return ((status if error in KEEP_STATUS else 200), json.dumps(answers if batch else answers[0]).encode(),
            "application/json")


def sse_message(message: Any) -> bytes:
    """One message as an event of an event stream."""
    return b"event: message\ndata: " + json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# masking


def mask_body(masker: Masker, content: bytes) -> tuple[bytes, Report]:
    """Mask an MCP body (one message or a batch): what each message carries, not its envelope."""
    report = Report()
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise MaskError("the MCP message is not valid JSON and cannot be masked") from None
    masked = [mask_message(masker, m, report) for m in doc] if isinstance(doc, list) else mask_message(masker, doc, report)
    if not report.masked:
        return content, report
    return json.dumps(masked, ensure_ascii=False, separators=(",", ":")).encode(), report


def mask_message(masker: Masker, msg: Any, report: Report) -> Any:
    """One message: a result's content, structured content, resource contents and prompt
    messages, an error's message and data, a request's or notification's parameters (a
    tool's arguments). Field paths are relative to each document a tool returns (its
    structured content, a text item that is JSON), not to the JSON-RPC envelope."""
    if not isinstance(msg, dict):
        return msg
    out = dict(msg)
    if isinstance(msg.get("result"), dict):
        out["result"] = _result(masker, msg["result"], report)
    if isinstance(msg.get("error"), dict):
        err = dict(msg["error"])
        if isinstance(err.get("message"), str):
            err["message"] = masker.lines(err["message"], report)
        if "data" in err:
            err["data"] = masker.document(err["data"], report)
        out["error"] = err
    if isinstance(msg.get("params"), dict):
        params = dict(msg["params"])
        if msg.get("method") == "tools/call" and isinstance(params.get("arguments"), dict):
            params["arguments"] = masker.document(params["arguments"], report)
        elif isinstance(params.get("messages"), list):  # sampling/createMessage
            params["messages"] = [_prompt_message(masker, m, report) for m in params["messages"]]
        else:
            params = masker.document(params, report)
        out["params"] = params
    return out


def _result(masker: Masker, result: dict[str, Any], report: Report) -> dict[str, Any]:
    out = {}
    rest = {k: v for k, v in result.items() if k not in ("content", "structuredContent", "contents", "messages")}
    if isinstance(result.get("content"), list):
        out["content"] = [_content(masker, c, report, f"content[{n}]") for n, c in enumerate(result["content"])]
    elif isinstance(result.get("content"), dict):  # a sampling result's one content block
        out["content"] = _content(masker, result["content"], report, "content")
    if "structuredContent" in result:
        out["structuredContent"] = masker.document(result["structuredContent"], report)
    if isinstance(result.get("contents"), list):
        out["contents"] = [_resource(masker, r, report, f"contents[{n}]") for n, r in enumerate(result["contents"])]
    if isinstance(result.get("messages"), list):
        out["messages"] = [_prompt_message(masker, m, report) for m in result["messages"]]
    for key in ("content", "structuredContent", "contents", "messages"):
        if key in result and key not in out:
            out[key] = masker.document(result[key], report)
    return {**(masker.document(rest, report) if rest else {}), **out}


def _prompt_message(masker: Masker, msg: Any, report: Report) -> Any:
    if isinstance(msg, dict) and isinstance(msg.get("content"), dict):
        return {**msg, "content": _content(masker, msg["content"], report, "content")}
    return masker.document(msg, report)


def _content(masker: Masker, item: Any, report: Report, where: str) -> Any:
    if not isinstance(item, dict):
        return masker.document(item, report)
    kind = item.get("type")
    if kind == "text" and isinstance(item.get("text"), str):
        return {**item, "text": _text(masker, item["text"], report, where)}
    if kind in ("image", "audio"):
        raise MaskError(f"{where} of the result is {kind} data, which cannot be masked")
    if kind == "resource" and isinstance(item.get("resource"), dict):
        return {**item, "resource": _resource(masker, item["resource"], report, f"{where}.resource")}
    return masker.document(item, report)


def _resource(masker: Masker, resource: Any, report: Report, where: str) -> Any:
    if not isinstance(resource, dict):
        return masker.document(resource, report)
    if "blob" in resource:
        raise MaskError(f"{where} is binary (a blob), which cannot be masked")
    out = masker.document({k: v for k, v in resource.items() if k != "text"}, report)
    if isinstance(resource.get("text"), str):
        out["text"] = _text(masker, resource["text"], report, where)
    return out


def _text(masker: Masker, text: str, report: Report, where: str) -> str:
    """Text a tool returned: a JSON document in it is masked as one (tools often return
    their data as JSON text); other text gets detection, line by line. Field and key masks
    need a structure: plain text is refused when one applies."""
    if (masked := masker.json_text(text, report)) is not None:
        return masked
    if masker.structural:
        raise MaskError(f"field and key masks need JSON, and {where} of the result is text; use detect masks")
    return masker.lines(text, report)


SECRET_MIN = 8
"""Connection secrets shorter than this are not searched for (they would match ordinary text)."""


def scrub(value: Any, secrets: tuple[str, ...], report: Report) -> Any:
    """The connection's own secrets (its credential, a stdio server's secret environment)
    replaced wherever they appear in what goes to an agent, whatever the rules say."""
    secrets = tuple(s for s in secrets if len(s) >= SECRET_MIN)
    if not secrets:
        return value

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            for s in secrets:
                if s in node:
                    report.fields["connection secret"] += node.count(s)
                    node = node.replace(s, "[REDACTED]")
            return node
        if isinstance(node, dict):
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(value)
