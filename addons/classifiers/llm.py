"""Model API classification: what a call to a model asks for.

A completion (Chat Completions, Responses, Anthropic Messages) or an embedding is `exec`:
it runs a model, on someone's bill, with what the prompt carries. Its resource is the
model; its details say which endpoint and wire format, whether it streams, the output
tokens it asks for at most (`max_tokens`: `max_completion_tokens`, `max_tokens` or
`max_output_tokens`), the tools it offers and the size of the conversation. Listing
models and counting tokens are reads. Other endpoints (files, batches, fine-tuning) are
classified as plain HTTP, keeping `endpoint: other`.

A body that is not a request of its endpoint's API (not JSON, no model, the other wire
format's shape, a field of the wrong type) keeps `invalid` (the reason) and is refused
before policy (addons/modelguard.py), as is a request to an endpoint of the other wire
format than the connection speaks.
"""

from __future__ import annotations

import dataclasses

from addons.classifiers import http
from addons.classifiers.http import normalise_path, parse_json_body
from addons.engine import llm
from addons.engine.model import UNPARSEABLE, Operation, Request

PROTOCOL = "llm"
READ, EXEC, UNKNOWN = "read", "exec", "unknown"
RISK = {READ: 10, EXEC: 50, UNKNOWN: 90}
READS = (llm.MODELS, llm.COUNT_TOKENS)


def invalid(connection: str, reason: str, details: dict) -> Operation:
    return Operation(PROTOCOL, connection, UNKNOWN, "(invalid)", RISK[UNKNOWN],
                     f"invalid model call on {connection}: {reason}", {**details, "invalid": reason})


def from_request(connection: str, request: Request) -> Operation:
    method = request.method.upper()
    path = normalise_path(request.target.partition("?")[0] or "/")
    name = llm.endpoint(method, path)
    details = {"http": method, "path": path, "endpoint": name, "format": llm.FORMAT.get(name, "")}
    if name == llm.OTHER:
        op = http.from_request(connection, request)
        return dataclasses.replace(op, protocol=PROTOCOL, details={**op.details, **details})
    if name == llm.MODELS:
        return Operation(PROTOCOL, connection, READ, path, RISK[READ], f"list models on {connection}", details)
    if method != "POST":
        return invalid(connection, f"{llm.API_NAMES[name]} is POST, not {method}", details)
    doc = parse_json_body(request.content, "application/json")
    if doc is None or doc is UNPARSEABLE:
        return invalid(connection, "the body is not one JSON document (no duplicate keys)", details)
    try:
        call = llm.read_request(name, doc)
    except llm.Invalid as e:
        return invalid(connection, str(e), details)
    action = READ if name in READS else EXEC
    streamed = " (streamed)" if call.stream else ""
    return Operation(PROTOCOL, connection, action, call.model, RISK[action],
                     f"{llm.API_NAMES[name]} call to {call.model} on {connection}{streamed}",
                     {**details, **call.details()}, payload=doc)
