"""MCP classification: what a request to an MCP server does, message by message.

A POST carries one JSON-RPC message or a batch; each message is an Operation (a batch has
`parts`, decided one by one, the strictest decision winning). `tools/call` names its tool
as the resource and its arguments are the payload rules look into; `resources/read` names
a URI, `prompts/get` a prompt; everything else is its method. A GET opens the session's
event stream (`custody/listen`), a DELETE ends the session (`custody/close`).

A tool's action is not the server's to say: here every tool call is `exec`, the riskiest,
until the chain's MCP addon applies the connection's configuration (addons/mcpguard.py).
A message that is not valid JSON-RPC 2.0 or not valid MCP keeps `invalid` (the reason)
and `jsonrpc_code`, and is refused before policy.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from addons.classifiers.http import normalise_path, parse_json_body
from addons.engine import mcp
from addons.engine.model import UNPARSEABLE, Operation, Request

PROTOCOL = "mcp"


def session_of(request: Request) -> str:
    """The MCP session a request belongs to: the Mcp-Session-Id header, or the older
    HTTP+SSE transport's `session_id` (or `sessionId`) query parameter."""
    if header := request.header("mcp-session-id"):
        return header
    query = dict(parse_qsl(request.target.partition("?")[2]))
    return query.get("session_id") or query.get("sessionId") or ""


def operation(connection: str, msg: mcp.Message, details: dict[str, Any]) -> Operation:
    """The Operation of one well-formed message (the chain's MCP addon refines tool calls)."""
    params = msg.params or {}
    details = {**details, "method": msg.method, "kind": msg.kind, "id": msg.id}
    if msg.kind == "response":
        details["error"] = "error" in msg.raw
        return Operation(PROTOCOL, connection, mcp.UNKNOWN, "(response)", mcp.RISK[mcp.UNKNOWN],
                         f"response to {msg.id!r} on {connection}", details)
    if msg.method == "tools/call":
        tool = params["name"]
        return Operation(PROTOCOL, connection, mcp.EXEC, tool, mcp.UNCONFIGURED_TOOL_RISK,
                         f"tools/call {tool} on {connection}", {**details, "tool": tool},
                         payload=params.get("arguments", {}))
    action = mcp.CLIENT_METHODS.get(msg.method, mcp.READ if msg.kind == "notification" else mcp.UNKNOWN)
    resource = {"resources/read": params.get("uri"), "prompts/get": params.get("name")}.get(msg.method) or msg.method
    target = "" if resource == msg.method else f" {resource}"
    return Operation(PROTOCOL, connection, action, resource, mcp.RISK[action], f"{msg.method}{target} on {connection}",
                     details, payload=msg.params)


def invalid(connection: str, code: int, reason: str, details: dict[str, Any], rid: Any = None) -> Operation:
    return Operation(PROTOCOL, connection, mcp.UNKNOWN, "(invalid)", mcp.RISK[mcp.UNKNOWN],
                     f"invalid MCP message on {connection}: {reason}",
                     {**details, "invalid": reason, "jsonrpc_code": code, "id": rid})


def part(connection: str, raw: Any, details: dict[str, Any]) -> Operation:
    try:
        msg = mcp.message(raw)
        mcp.check_params(msg)
    except mcp.Invalid as e:
        said = raw.get("method") if isinstance(raw, dict) and isinstance(raw.get("method"), str) else None
        return invalid(connection, e.code, str(e), {**details, **({"method": said} if said else {})},
                       mcp.request_id(raw))
    return operation(connection, msg, details)


def from_request(connection: str, request: Request) -> Operation:
    method = request.method.upper()
    session = session_of(request)
    details: dict[str, Any] = {"http": method, "path": normalise_path(request.target.partition("?")[0] or "/"),
                               "session": session}
    if session and not mcp.SESSION_ID.match(session):
        return invalid(connection, mcp.INVALID_REQUEST, "the session id must be 1-256 visible ASCII characters",
                       {**details, "session": ""})
    if method in ("GET", "DELETE"):
        pseudo = mcp.LISTEN if method == "GET" else mcp.CLOSE
        return Operation(PROTOCOL, connection, mcp.READ, pseudo, mcp.RISK[mcp.READ], f"{pseudo} on {connection}",
                         {**details, "method": pseudo, "kind": "transport", "id": None})
    if method != "POST":
        return invalid(connection, mcp.INVALID_REQUEST, f"MCP is POST, GET or DELETE, not {method}", details)
    doc = parse_json_body(request.content, "application/json")
    if doc is UNPARSEABLE or doc is None:
        return invalid(connection, mcp.PARSE_ERROR, "the body is not one JSON document (JSON-RPC parse error)", details)
    if not isinstance(doc, list):
        return part(connection, doc, details)
    if not doc:
        return invalid(connection, mcp.INVALID_REQUEST, "an empty batch", {**details, "batch": True})
    parts = tuple(part(connection, raw, {**details, "batch": True}) for raw in doc)
    ids = [mcp.id_key(p.details["id"]) for p in parts if p.details.get("id") is not None]
    if len(set(ids)) != len(ids):
        parts = tuple(invalid(connection, mcp.INVALID_REQUEST, "two messages of the batch have the same id",
                              p.details, p.details.get("id")) for p in parts)
    bad = next((n for n, p in enumerate(parts) if "invalid" in p.details), None)
    summary = f"batch of {len(parts)} MCP messages on {connection}"
    if bad is not None:
        summary += f" (message {bad + 1} is invalid: {parts[bad].details['invalid']})"
    top = {**details, "batch": True, "method": "(batch)", "kind": "batch", "id": None,
           **({"invalid": f"message {bad + 1} of the batch is invalid", "jsonrpc_code": mcp.INVALID_REQUEST}
              if bad is not None else {})}
    strongest = max(parts, key=lambda p: p.risk)
    return Operation(PROTOCOL, connection, strongest.action, "(batch)", strongest.risk, summary, top, parts=parts)
