"""The vocabulary of docs/design.md as plain data: Principal, Operation, Decision, Review.

These are what every part of Custody passes around: identity writes a Principal, a
classifier an Operation, policy a Decision; the store records them, the evidence tools
read them back. Nothing here knows about mitmproxy, so the engines, the bridges and the
client helper share the same types.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("read", "write", "delete", "ddl", "exec", "admin", "unknown")
EFFECTS = ("allow", "review", "deny")
MARKERS = {"allow": ":heavy_check_mark:", "review": ":warning:", "deny": ":heavy_multiplication_x:",
           "approved": ":ballot_box_with_check:"}
"""How a decision is marked on a flow (mitmweb shows only emoji shortcodes): ✔ ⚠ ✖ ☑, symbols
that ordinary text fonts have, since servers rarely have an emoji font. The decision itself
is written out in the flow's comment."""

AGENT_ATTRIBUTES = ("agent", "model", "run", "task", "prompt", "justification")
"""What an agent may say about itself (verified when the token carries it, else asserted).
`justification` is why it asks: shown to approvers, recorded, and required by rules whose
review says `require_justification`."""
MAX_ATTRIBUTE = 256
MAX_JUSTIFICATION = 1024


def attribute_limit(name: str) -> int:
    """How many characters of an attribute are kept: a justification is a sentence or two."""
    return MAX_JUSTIFICATION if name == "justification" else MAX_ATTRIBUTE


class Unparseable:
    """The request body claimed or looked like JSON and could not be parsed."""

    def __repr__(self) -> str:
        return "UNPARSEABLE"


UNPARSEABLE = Unparseable()
"""The payload of a request whose JSON body cannot be read: rules count it against the agent."""


class AnyPayload:
    """Stands for every payload an operation could have (an MCP tool, listed before any call)."""

    def __repr__(self) -> str:
        return "ANY_PAYLOAD"


ANY_PAYLOAD = AnyPayload()
"""The payload of an operation asked about in general: body and argument conditions may hold
for allow and review rules, and need not for deny rules."""


@dataclass(frozen=True)
class Request:
    """A request as a classifier sees it: method, target (path and query), headers in
    order (names as sent, repeated names kept) and body."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    content: bytes | None = None

    def header(self, name: str, default: str = "") -> str:
        """The header's values joined with ", " (as HTTP folds repeated fields)."""
        name = name.lower()
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else default

    def header_map(self) -> dict[str, str]:
        """Lower-cased names to their values joined with ", "."""
        out: dict[str, list[str]] = self.header_lists()
        return {k: ", ".join(v) for k, v in out.items()}

    def header_lists(self) -> dict[str, list[str]]:
        """Lower-cased names to every value sent under them, in order."""
        out: dict[str, list[str]] = {}
        for k, v in self.headers:
            out.setdefault(k.lower(), []).append(v)
        return out


def canonical_json(value: Any) -> str:
    """The one JSON encoding of audit data: sorted keys, no spaces, UTF-8 kept (and a
    byte that was not UTF-8 escaped: `storable`)."""
    return storable(json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False))


def storable(text: str) -> str:
    """`text` as UTF-8 can carry it, for the store and for hashing. A byte of a URL or a
    header that was not UTF-8 reaches us as a lone surrogate (mitmproxy decodes with
    surrogateescape), which no UTF-8 encoder takes: it becomes its escape, `\\udcff`, which
    inside JSON reads back as the same character. Other text is unchanged."""
    return text.encode("utf-8", "backslashreplace").decode()


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
    """The statements of a multi-statement SQL string, the commands of a shell line, or the
    two readings of a Kubernetes path the API server may split otherwise: policy decides
    each one, and the strictest decision wins."""

    @functools.cached_property
    def json(self) -> str:
        return canonical_json(self.as_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Operation:
        """The Operation `as_dict` recorded (its parts too; never the payload)."""
        parts = tuple(cls.from_dict(p) for p in d.get("parts", ()))
        return cls(d["protocol"], d["connection"], d["action"], d["resource"], d["risk"], d["summary"],
                   d.get("details", {}), parts=parts)

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
    require_justification: bool = False
    grant_max: float = 0.0
    """The longest time-boxed grant an approver may answer with (0: none)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "approvers": list(self.approvers),
            "approvals": self.approvals,
            "denials": self.denials,
            "timeout": self.timeout,
            "ttl": self.ttl,
            "require_justification": self.require_justification,
            "grant_max": self.grant_max,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Review:
        return cls(tuple(d["approvers"]), d["approvals"], d["denials"], d["timeout"], d["ttl"],
                   d.get("require_justification", False), d.get("grant_max", 0.0))


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
    grant: str = ""
    """The time-boxed grant that allowed a request without a new hold (addons/engine/grants.py)."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "effect": self.effect,
            "rules": list(self.rules),
            "reason": self.reason,
        }
        if self.approval:
            out["approval"] = self.approval
        if self.grant:
            out["grant"] = self.grant
        if self.masks:
            out["masks"] = list(self.masks)
        if self.reviews:
            out["reviews"] = [r.as_dict() for r in self.reviews]
        if self.error:
            out["error"] = self.error
        return out


_PROCESS = os.urandom(6).hex()
_COUNTER = itertools.count()


def _reseed() -> None:
    """A forked child (a worker, a multiprocessing child) is another process: ids it makes
    must never collide with its parent's or its siblings'."""
    global _PROCESS, _COUNTER
    _PROCESS, _COUNTER = os.urandom(6).hex(), itertools.count()


os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A sortable unique id: milliseconds since the epoch, a random per-process part, a counter."""
    return f"{int(time.time() * 1000):012x}{_PROCESS}{next(_COUNTER) & 0xFFFFFFFF:08x}"
