"""The flow's context: what each addon learned about one request.

One `Context` lives at `flow.metadata["custody"]` and travels from addon to addon:
identity writes the Principal, classify the connection name and Operation, policy the
Decision, the recorder the ids of the events it wrote. Each addon reads what earlier ones
wrote and adds its own part; none reaches around the chain (docs/design.md).

Everything here is plain data (no sockets, no secrets), so a flow can be copied or
inspected without side effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mitmproxy import flow as mflow

from addons.engine import llm
from addons.engine.masks import parse as parse_mask
from addons.engine.mcp import MCP_MESSAGES
from addons.engine.model import Decision, Operation, Principal, new_id

KEY = "custody"
REQUESTED = "custody.requested"
"""flow.metadata: (scheme, host, port) as the agent asked, before credentials rerouted it."""
TEXT_SUBRESOURCES = ("log", "exec", "attach")


@dataclass
class Context:
    """The flow's context. `decision_event` is fixed up front so a denial can name it.

    Copying a flow (mitmproxy's replay, duplicate, or saving it to a flow file, all of which
    deep-copy `flow.metadata`) yields a plain-data snapshot instead of a Context. A copied
    flow is a new request: `of()` starts it with a fresh context, so it is identified,
    decided and recorded again and never inherits the original's clearance.
    """

    session: str
    principal: Principal | None = None
    connection: str = ""
    protocol: str = ""
    """The connection's kind, known before the operation is (refusals answer in its shape)."""
    operation: Operation | None = None
    record_masks: tuple | None = None
    """The masks the flow's record uses (request body and operation), fixed by the first
    addon that records it (hold, for an approval; else the recorder): a review that ends in
    a refusal drops the decision's masks, and must not drop them from the record."""
    recorded_operation: Operation | None = None
    """The operation as it goes on record, masked with `record_masks`."""
    decision: Decision | None = None
    decision_event: str = field(default_factory=new_id)
    recorded: bool = False
    masked: bool = False
    destination: tuple[str, int] | None = None
    sent: str = ""
    """The digest of the request as the chain let it go (addons/credentials.py)."""
    approval: str = ""
    upgrade: str = ""
    """The Upgrade header as the client sent it (mitmproxy's disable_h2c strips h2c's)."""
    masking: dict[str, Any] | None = None
    response_body: bytes | None = None
    stream: Any = field(default=None, repr=False)
    """The masked stream the agent is receiving, when the response is streamed."""
    transaction: dict[str, Any] | None = None
    """A SQL session's transaction after the flow ran (its id and status), recorded with the
    response so that after a crash the trail can say whether it committed."""
    events: list[str] = field(default_factory=list)
    switched: Any = field(default=None, repr=False)
    """The write of the flow's 101 response event, not waited for (Recorder.response): every
    later write of the flow waits for it."""

    def __deepcopy__(self, memo: dict) -> dict[str, Any]:
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """The context as plain data (what flow files and exports carry)."""
        return {
            "session": self.session,
            "principal": self.principal.as_dict() if self.principal else None,
            "connection": self.connection,
            "operation": self.operation.as_dict() if self.operation else None,
            "decision": self.decision.as_dict() if self.decision else None,
            "decision_event": self.decision_event,
            "approval": self.approval,
            "masking": self.masking,
            "events": list(self.events),
        }

    @property
    def cleared(self) -> bool:
        """May this flow leave the gateway? Only with an allow decision that is on record."""
        return self.recorded and self.decision is not None and self.decision.effect == "allow"


def of(f: mflow.Flow) -> Context:
    """The flow's context, created on first use (and afresh for a copied flow)."""
    ctx = f.metadata.get(KEY)
    if not isinstance(ctx, Context):
        ctx = Context(session=f.client_conn.id)
        f.metadata[KEY] = ctx
    return ctx


LOG_FIELDS = "custody"
"""The attribute of a log record that carries the flow's ids (addons/logs.py prints them)."""


def log_fields(f: mflow.Flow) -> dict[str, Any]:
    """`extra=` for a log line about flow `f`: its flow id, session, decision event and the
    events on record so far, which tie the line to the audit record."""
    ctx = of(f)
    return {LOG_FIELDS: {"flow": f.id, "session": ctx.session, "connection": ctx.connection,
                         "decision_event": ctx.decision_event, "events": list(ctx.events)}}


def restart(f: mflow.Flow, session: str) -> Context:
    """A fresh context for a new request carried by an old flow object (mitmproxy replays
    a flow in place), in its own session: nothing of the original's clearance survives."""
    ctx = Context(session=session)
    f.metadata[KEY] = ctx
    return ctx


def response_masks(ctx: Context) -> tuple:
    """The decision's masks that apply to the flow's response (none unless it was allowed).
    A container's log and terminal, and the API server's own non-resource endpoints
    (health, metrics), are text, not API objects: only detection applies to them."""
    if ctx.decision is None or ctx.decision.effect != "allow":
        return ()
    op = ctx.operation
    if op is not None and op.protocol == "kubernetes" and (
            op.details.get("subresource") in TEXT_SUBRESOURCES or not op.details.get("resource_request")):
        return tuple(m for m in ctx.decision.masks if parse_mask(m).kind == "detect")
    return tuple(ctx.decision.masks)


def body_type(ctx: Context, content_type: str) -> str:
    """What a request body is masked as: an MCP body message by message (a tool's arguments
    and results, not the JSON-RPC envelope), a model call as its prompt (what the messages
    carry), anything else as its content type says."""
    if ctx.protocol == "mcp":
        return MCP_MESSAGES
    if ctx.protocol == "llm" and ctx.operation is not None and "invalid" not in ctx.operation.details:
        return llm.content_type("request", ctx.operation.details.get("endpoint", llm.OTHER))
    return content_type


def own_masking(ctx: Context) -> bool:
    """Is the response masked by the protocol's own addon rather than the masking addon:
    MCP message by message (addons/mcpguard.py), a completion part by part
    (addons/modelguard.py)?"""
    return ctx.protocol == "mcp" or (ctx.protocol == "llm" and ctx.operation is not None
                                     and ctx.operation.details.get("endpoint") in llm.COMPLETIONS)
