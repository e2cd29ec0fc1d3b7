"""HTTP classification: what a plain HTTP request does, in the Operation vocabulary.

Rules match on the normalised path, so every spelling a server would treat as the same
resource must normalise to the same string: percent-encoding (decoded repeatedly, which
defeats double encoding), duplicate and trailing slashes, and `;params` that servlet
containers strip. Dot segments and backslashes are different: servers disagree on them,
so a path that has them (at any depth of encoding) is refused, not resolved (`ambiguity`).

Method overrides are honoured wherever frameworks read them: headers, the query, and the
body (a form field or top-level JSON key `_method`, as Rails, Laravel and Symfony read it).
When the real method and any override disagree the riskiest action wins: the gateway
cannot know which the server will act on. A form body that names `_method` in a way the
gateway cannot read counts as an unknown method.

A connection whose backend routes case-insensitively gets its paths folded to lower case
(`fold_case`), so rules match what the backend will route to; a path with a non-ASCII
letter that folds into ASCII (`ı`, `ſ`, the Kelvin sign) is refused, since backends fold
those differently.

`header_problem` names header forms RFC 9110/9112 say a proxy must reject or replace
(obs-fold, CR/LF/NUL or other controls in a value, more than one Host): they are
refused, never forwarded as they came.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import json
import re
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
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
OVERRIDE_NAME = re.compile(r"(?i)_\s*method")
"""Any mention of the override field, however spelled: counted against what was read."""


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


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_override(name: str) -> bool:
    return name.strip().lower() in OVERRIDE_PARAMS


def body_overrides(content: bytes | None, content_type: str, payload: Any) -> list[str]:
    """Every method override a server could read from the body: `_method` form fields
    (url-encoded, multipart, or a body with no content type, which Rack reads as a form)
    and a top-level JSON `_method` (Laravel reads JSON input like form input). A form body
    that mentions `_method` more often than the gateway could read it yields UNKNOWN."""
    if not content:
        return []
    kind = media_type(content_type)
    if isinstance(payload, dict):
        return [v if isinstance(v, str) else UNKNOWN for k, v in payload.items() if _is_override(k)]
    if payload is UNPARSEABLE:
        return [UNKNOWN] if OVERRIDE_NAME.search(content.decode("latin-1")) else []
    if payload is not None:
        return []  # a JSON list or scalar has no top-level fields
    if kind == MULTIPART:
        return _multipart_overrides(content, content_type)
    if kind in (FORM, ""):
        return form_overrides(content.decode("latin-1"))
    return []


def form_overrides(text: str) -> list[str]:
    """The `_method` fields of a url-encoded form or query string."""
    found = [v for k, v in parse_qsl(text, keep_blank_values=True) if _is_override(k)]
    if len(OVERRIDE_NAME.findall(unquote(unquote(text.replace("+", " "))))) > len(found):
        found.append(UNKNOWN)
    return found


def _multipart_overrides(content: bytes, content_type: str) -> list[str]:
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + content)
    found = []
    if message.is_multipart():
        for part in message.iter_parts():
            if _is_override(str(part.get_param("name", "", header="content-disposition"))):
                found.append((part.get_payload(decode=True) or b"").decode("latin-1"))
    if len(OVERRIDE_NAME.findall(content.decode("latin-1"))) > len(found):
        found.append(UNKNOWN)
    return found


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
    method = method.upper()
    content_type = headers.get("content-type", "")
    payload = parse_json_body(content, content_type)
    overrides = [headers[h] for h in OVERRIDE_HEADERS if h in headers]
    overrides += form_overrides(raw_query)
    overrides += body_overrides(content, content_type, payload)
    action = action_of(method)
    details: dict[str, Any] = {"method": method, "path": path, "query": raw_query}
    override = ""
    if overrides := [o.strip().upper() for o in overrides if o.strip()]:
        override = max(overrides, key=lambda o: RISK[action_of(o)])
        details["method_override"] = override
        action = riskier(action, action_of(override))
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


def case_ambiguity(path: str) -> str | None:
    """Why a case-insensitive backend might fold this path to another resource: a
    non-ASCII letter whose upper, lower or folded case is ASCII (`ı` -> I, `ſ` -> S)."""
    for ch in unquote(path):
        if not ch.isascii() and any(c.isascii() for c in ch.upper() + ch.lower() + ch.casefold()):
            return f"the path contains {ch!r}, which case-insensitive servers may read as ASCII"
    return None


def fold_case(op: Operation) -> Operation:
    """The Operation as a case-insensitive backend routes it: the path in lower case."""
    folded = op.resource.lower()
    return dataclasses.replace(op, resource=folded, details={**op.details, "path": folded, "path_case": "insensitive"},
                               summary=op.summary.replace(op.resource, folded, 1))


CONTROLS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def header_problem(fields: tuple[tuple[bytes, bytes], ...], http_version: str = "") -> str | None:
    """Why these headers must be refused rather than forwarded (RFC 9112 5.2, RFC 9110 5.5
    and 7.2), or None. mitmproxy's parser keeps an obs-fold as CRLF + space inside the
    value, and lets controls through; both are refused here. Two Hosts count only in an
    HTTP/1 request (`http_version`; a response passes none)."""
    hosts = 0
    for name, value in fields:
        if b"\r\n" in value or b"\n" in value:
            return f"header {name.decode('latin-1')!r} uses obsolete line folding (obs-fold)"
        if CONTROLS.search(value):
            return f"header {name.decode('latin-1')!r} contains a control character"
        if CONTROLS.search(name) or not name:
            return "a header name contains a control character"
        hosts += name.lower() == b"host"
    if hosts > 1 and http_version.startswith("HTTP/1"):
        return "the request has more than one Host header"
    return None
