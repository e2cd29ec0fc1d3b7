"""The flow's context: what each addon learned about one request, in DESIGN.md's words.

One `Context` lives at `flow.metadata["custody"]` and travels from addon to addon:
identity writes the Principal, classify the connection name and Operation, policy the
Decision, the recorder the ids of the events it wrote. Each addon reads what earlier ones
wrote and adds its own part; none reaches around the chain.

Everything here is plain data (no sockets, no secrets), so a flow can be copied or
inspected without side effects.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import flow as mflow

KEY = "custody"

ACTIONS = ("read", "write", "delete", "ddl", "exec", "admin", "unknown")
EFFECTS = ("allow", "review", "deny")


def canonical_json(value: Any) -> str:
    """The one JSON encoding of audit data: sorted keys, no spaces, UTF-8 kept."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


@dataclass(frozen=True)
class Principal:
    """Who is asking. `agent` comes from verified claims; `asserted` from X-Custody-* headers."""

    subject: str
    issuer: str
    groups: tuple[str, ...] = ()
    agent: dict[str, str] = field(default_factory=dict)
    asserted: dict[str, str] = field(default_factory=dict)
    token_id: str = ""
    token_fingerprint: str = ""
    expires: float = 0.0

    def attribute(self, name: str) -> str:
        """An agent attribute: the verified claim when there is one, else the asserted header."""
        return self.agent.get(name) or self.asserted.get(name, "")

    @functools.cached_property
    def json(self) -> str:
        """As recorded; computed once per Principal (the verifier reuses it per token)."""
        return canonical_json(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": list(self.groups),
            "agent": dict(self.agent),
            "asserted": dict(self.asserted),
            "token_id": self.token_id,
            "token_fingerprint": self.token_fingerprint,
        }


@dataclass(frozen=True)
class Operation:
    """What the request does, protocol-aware."""

    protocol: str
    connection: str
    action: str
    resource: str
    risk: int
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    payload: Any = field(default=None, repr=False, compare=False)
    """The parsed request document rules may look into (JSON body); never recorded here."""
    parts: tuple[Operation, ...] = field(default=(), compare=False)
    """The statements of a multi-statement SQL string: policy decides each one."""

    @functools.cached_property
    def json(self) -> str:
        return canonical_json(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "connection": self.connection,
            "action": self.action,
            "resource": self.resource,
            "risk": self.risk,
            "summary": self.summary,
            "details": self.details,
            **({"parts": [p.as_dict() for p in self.parts]} if len(self.parts) > 1 else {}),
        }


@dataclass(frozen=True)
class Review:
    """Who must approve a `review` decision, how many, and for how long a hold lasts."""

    approvers: tuple[str, ...]
    approvals: int = 1
    denials: int = 1
    timeout: float = 300.0
    ttl: float = 3600.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "approvers": list(self.approvers),
            "approvals": self.approvals,
            "denials": self.denials,
            "timeout": self.timeout,
            "ttl": self.ttl,
        }


@dataclass(frozen=True)
class Decision:
    """The outcome of policy (or of an addon that refused the flow before policy ran)."""

    effect: str
    rules: tuple[str, ...] = ()
    reason: str = ""
    masks: tuple[Any, ...] = ()
    reviews: tuple[Review, ...] = ()
    status: int = 0
    error: str = ""
    approval: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "effect": self.effect,
            "rules": list(self.rules),
            "reason": self.reason,
        }
        if self.approval:
            out["approval"] = self.approval
        if self.masks:
            out["masks"] = list(self.masks)
        if self.reviews:
            out["reviews"] = [r.as_dict() for r in self.reviews]
        if self.error:
            out["error"] = self.error
        return out


_PROCESS = os.urandom(6).hex()
_COUNTER = itertools.count()


def new_id() -> str:
    """A sortable unique id: milliseconds since the epoch, a random per-process part, a counter."""
    return f"{int(time.time() * 1000):012x}{_PROCESS}{next(_COUNTER) & 0xFFFFFFFF:08x}"


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
    decision: Decision | None = None
    decision_event: str = field(default_factory=new_id)
    recorded: bool = False
    masked: bool = False
    destination: tuple[str, int] | None = None
    approval: str = ""
    masking: dict[str, Any] | None = None
    response_body: bytes | None = None
    stream: Any = field(default=None, repr=False)
    """The masked stream the agent is receiving, when the response is streamed."""
    events: list[str] = field(default_factory=list)

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
