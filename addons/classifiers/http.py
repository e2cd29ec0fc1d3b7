"""HTTP classification: what a plain HTTP request does, in the Operation vocabulary.

Rules match on the normalised path, so every spelling a server would treat as the same
resource must normalise to the same string: percent-encoding (decoded repeatedly, which
defeats double encoding), duplicate and trailing slashes, and `;params` that servlet
containers strip. Dot segments and backslashes are different: servers disagree on them,
so a path that has them (at any depth of encoding) is refused, not resolved (`ambiguity`). Method-override headers are honoured, and when
the real method and the override disagree the riskier action wins: the gateway cannot know
which of the two the server will act on.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, unquote

from addons.engine.model import UNPARSEABLE, Operation, Request

READ, WRITE, DELETE, UNKNOWN = "read", "write", "delete", "unknown"

ACTION_OF_METHOD = {
    "GET": READ,
    "HEAD": READ,
    "OPTIONS": READ,
    "POST": WRITE,
    "PUT": WRITE,
    "PATCH": WRITE,
    "DELETE": DELETE,
}
RISK = {READ: 10, WRITE: 40, DELETE: 70, UNKNOWN: 90}
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_PARAMS = ("_method",)


def normalise_path(path: str) -> str:
    """`/a/./b//c/../d%2f%2e%2e/e/` -> `/a/b/e`: the resource as a server would resolve it."""
    *_, decoded = _decodings(path)
    segments: list[str] = []
    for segment in decoded.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return "/" + "/".join(segments)


def _decodings(path: str):
    """The path and what it decodes to, once, twice, ... until it stops changing."""
    yield path
    for _ in range(4):
        once = unquote(path)
        if once == path:
            return
        path = once
        yield path


def ambiguity(path: str) -> str | None:
    """Why a backend might resolve this path differently than the gateway, if it might.

    The gateway decides on the resolved path; a server that resolves `..`, `.` or `\\`
    differently (or not at all) would act on another resource. Such paths are refused
    rather than guessed at.
    """
    for decoded in _decodings(path):
        if "\\" in decoded:
            return "the path contains a backslash"
        for segment in decoded.split("/"):
            if segment.split(";", 1)[0] in (".", ".."):
                return "the path contains a '.' or '..' segment"
    return None


def action_of(method: str) -> str:
    return ACTION_OF_METHOD.get(method.upper(), UNKNOWN)


def riskier(a: str, b: str) -> str:
    return a if RISK[a] >= RISK[b] else b


def parse_json_body(content: bytes | None, content_type: str) -> Any:
    """The JSON document in a request body; None when there is no JSON body.

    Duplicate keys make the body UNPARSEABLE: a server may read the first value where we
    read the last, so no rule may be decided on either.
    """
    if not content:
        return None
    looks_json = "json" in content_type.lower() or content.lstrip()[:1] in (b"{", b"[")
    if not looks_json:
        return None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate key")
        return out

    try:
        return json.loads(content, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return UNPARSEABLE


def classify(
    connection: str,
    method: str,
    target: str,
    headers: dict[str, str],
    content: bytes | None,
) -> Operation:
    """The Operation for one HTTP request. `headers` keys are lower-case."""
    raw_path, _, raw_query = target.partition("?")  # not urlsplit: "//x" is a path here, not a host
    path = normalise_path(raw_path or "/")
    query = parse_qsl(raw_query, keep_blank_values=True)
    method = method.upper()
    action = action_of(method)
    override = next((headers[h] for h in OVERRIDE_HEADERS if h in headers), "")
    override = override or next((v for k, v in query if k in OVERRIDE_PARAMS), "")
    details: dict[str, Any] = {"method": method, "path": path, "query": raw_query}
    if override:
        override = override.strip().upper()
        details["method_override"] = override
        action = riskier(action, action_of(override))
    payload = parse_json_body(content, headers.get("content-type", ""))
    details["body"] = (
        "none" if not content else
        "unparseable" if payload is UNPARSEABLE else
        "json" if payload is not None else "other"
    )
    shown = method + (f" (as {override})" if override else "")
    return Operation(
        protocol="http",
        connection=connection,
        action=action,
        resource=path,
        risk=RISK[action],
        summary=f"{shown} {path} on {connection}",
        details=details,
        payload=payload,
    )


def from_request(connection: str, request: Request) -> Operation:
    return classify(connection, request.method, request.target, request.header_map(), request.content)
