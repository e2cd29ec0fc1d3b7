"""Refusing flows, and making sure a broken addon refuses instead of waving traffic on.

mitmproxy logs an exception raised in a hook and carries on with the next addon and with
the upstream. Left alone, a bug in policy would let traffic through. Every Custody hook is
wrapped in `guarded`: an exception ends the flow with a 502 carrying a JSON reason, and the
flow's decision says which addon failed so the recorder (later in the chain) writes it down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.net.http import status_codes

from addons import context
from addons.engine import mcp
from addons.engine.errors import HINTS, Error
from addons.engine.model import Decision

logger = logging.getLogger(__name__)


def refuse(
    f: mflow.Flow,
    status: int,
    reason: str,
    *,
    error: str,
    rules: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
    approval: str = "",
    extra: dict[str, str] | None = None,
) -> None:
    """Deny the flow: record the decision in its context and answer it locally with JSON
    (a Kubernetes Status for kubernetes connections, JSON-RPC errors for mcp connections).

    `approval` and `extra` add the approval id and state when a review ended this way.
    Non-HTTP flows (raw TCP, UDP) have nothing to answer with and are killed.
    """
    ctx = context.of(f)
    if ctx.recorded:
        # A late refusal, after the request and its decision went on record: it is a new
        # decision with its own event, which the recorder writes with the response.
        ctx.decision_event = context.new_id()
        ctx.recorded = False
    ctx.decision = Decision(
        effect="deny", rules=rules, reason=reason, status=status, error=error, approval=approval
    )
    if not isinstance(f, http.HTTPFlow):
        if f.killable:
            f.kill()
        return
    body = {
        "decision": "deny",
        "error": error,
        "reason": reason,
        "rules": list(rules),
        "event_id": ctx.decision_event,
        **({"approval_id": approval} if approval else {}),
        **({"hint": HINTS[error]} if error in HINTS else {}),
        **(extra or {}),
    }
    content, content_type = None, "application/json"
    if ctx.protocol == "kubernetes":
        body.update(kubernetes_status(status, reason))
        if status == 401:  # kubectl prints a generic "provide credentials" for a 401 on its
            # discovery path, which reads the body raw; it always prints Warning headers
            headers = {**(headers or {}), "warning": kubernetes_warning(reason)}
    elif ctx.protocol == "mcp":  # JSON-RPC errors with the request ids: what MCP clients surface
        status, content, content_type = mcp.refusal(ctx.operation, status, error, body,
                                                    stream=bool(f.metadata.get(mcp.AS_STREAM)))
    f.response = http.Response.make(
        status,
        content if content is not None else json.dumps(body),
        {"content-type": content_type, **(headers or {})},
    )
    f.response.reason = reason_phrase(status, error, reason)


def reason_phrase(status: int, error: str, reason: str) -> str:
    """The status line's reason phrase, carrying the refusal's reason: proxy clients show
    only the status line of a refused CONNECT (httpx: `ProxyError: 403 Forbidden (…)`,
    requests: `Tunnel connection failed: 403 …`). Printable ASCII only (RFC 9112 4), short."""
    text = f"{status_codes.RESPONSES.get(status, 'Refused')} (custody {error}: {reason})"
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:REASON_PHRASE_MAX]


REASON_PHRASE_MAX = 240


def refuse_at_headers(f: http.HTTPFlow, status: int, reason: str, *, error: str) -> None:
    """Refuse a response as soon as its headers arrive: the upstream's bytes are drained
    and dropped, and the agent gets the refusal (which the recorder stores as the body)."""
    refuse(f, status, reason, error=error)
    f.response.stream = Drain(f.response.content)
    context.of(f).response_body = f.response.content


def chunks(out: bytes) -> list[bytes]:
    """What a stream hook hands mitmproxy: a list, empty when there is nothing to send. An
    empty bytes chunk would go to an HTTP/1.1 client as the chunk that ends the body."""
    return [out] if out else []


class Drain:
    """A stream hook for a response refused at its headers: drop the upstream's bytes, then
    send the refusal's own body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        return chunks(self.body if chunk == b"" else b"")


STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                  502: "InternalError", 503: "ServiceUnavailable"}


def kubernetes_status(status: int, reason: str) -> dict:
    """A refusal as a Kubernetes Status, which clients understand: kubectl prints
    `Error from server (Forbidden): custody: <reason>`. Status's own `reason` is its enum;
    Custody's fields (decision, error, rules, event_id, approval_id) stay beside it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"custody: {reason}", "reason": STATUS_REASONS.get(status, "Forbidden"), "code": status}


def kubernetes_warning(reason: str) -> str:
    """A Warning header (RFC 7234 5.5, as the API server sends them: `299 - "text"`) that
    client-go prints as `Warning: custody: <reason>`."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in f"custody: {reason}")[:REASON_PHRASE_MAX]
    return '299 - "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def answered(f: mflow.Flow) -> bool:
    """Has an earlier addon already answered (or killed) this flow?"""
    if f.error is not None:
        return True
    return isinstance(f, http.HTTPFlow) and f.response is not None


def _fail(addon: object, hook: str, f: Any, exc: BaseException) -> None:
    name = type(addon).__name__.lower()
    if not isinstance(f, mflow.Flow):
        logger.error("custody %s.%s failed", name, hook, exc_info=exc)
        return
    logger.error("custody %s.%s failed; refusing the flow", name, hook, exc_info=exc, extra=context.log_fields(f))
    try:
        refuse(
            f,
            502,
            f"internal error in the {name} addon ({hook}): {type(exc).__name__}",
            error=Error.GATEWAY_ERROR,
        )
    except Exception:
        logger.exception("refusing the flow failed too; killing it")
        f.kill()


def guarded(hook: Callable) -> Callable:
    """Wrap an addon hook so that any exception refuses the flow (fail closed)."""
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self, f, *args):
            try:
                return await hook(self, f, *args)
            except Exception as exc:
                _fail(self, hook.__name__, f, exc)
            except asyncio.CancelledError as exc:
                # Not an Exception: without this the flow would leave the hook unanswered and
                # unrecorded. It is refused either way; a cancellation of the hook's own task
                # (shutdown) still propagates once the flow has its answer.
                _fail(self, hook.__name__, f, exc)
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise

        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self, f, *args):
        try:
            return hook(self, f, *args)
        except Exception as exc:
            _fail(self, hook.__name__, f, exc)

    return wrapper
