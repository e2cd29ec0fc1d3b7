"""Provenance: which model output asked for an infrastructure request.

The gateway sees both sides when an agent's calls to its model go through it: the tool
calls a completion asks for, and the requests the agent's tools then make. It keeps, per
principal and crew run, the tool calls models recently asked for (the `Ledger`), and
matches each request against them in the request's own protocol's normal form (the forms
come from addons/classifiers/forms.py): a request is `exact` when the model's output holds
it as sent (the SQL text, the command line, the method, path and body, the tool and its
arguments), `normalised` when it holds it in the protocol's normal form (the statements'
parse trees, the words of the line, the resolved path and the JSON document), and `none`
when no model output seen by the gateway asked for it. Requests that are not commands
(a session opening, a transaction's BEGIN, an MCP handshake, kubectl's discovery) are
`n/a`: there is nothing a model could have asked for.

Replicas share what models asked for through the audit store: each completion's tool calls
are kept in the transaction that records it (`tool_calls`, addons/engine/store.py). A
request that matches nothing in this process's ledger is matched again against the
principal's recent calls in the store, by the same rules (`current`, then `match`), since
its model call may have gone through another replica; when the store cannot be read, its
provenance is `unknown`, which no rule takes for asked.

What an agent says about itself (X-Custody-Model, X-Custody-Prompt) is recorded beside the
verdict as `asserted`, so a request claiming a model it has no output from shows both.
Pure code (no mitmproxy).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from addons.engine.model import Principal

EXACT, NORMALISED, NONE, NOT_APPLICABLE, UNKNOWN = "exact", "normalised", "none", "n/a", "unknown"
VERIFIED = (EXACT, NORMALISED)
WINDOW = 1800.0
"""How long a tool call is remembered by default (an llm connection's `llm.remember`)."""
PER_KEY = 256
"""The most recent tool calls kept per principal and run."""
KEYS = 10_000
"""The most principals and runs kept at once (the least recently used go first)."""
EXCERPT = 400
NOTHING_ASKED = "no model output seen by the gateway asked for it"
NOTHING_ASKED_HERE = "no model output seen by this gateway replica asked for it"


@dataclass(frozen=True)
class Asked:
    """A tool call a model asked for, as remembered: the completion event that recorded it,
    the model call's flow and connection, the model, the call's id (a ReAct action has
    none: `call` is then the completion event's, with `#0`), the tool and its arguments
    (as the agent received them: masked) and what the model wrote for it."""

    event: str
    flow: str
    connection: str
    model: str
    call: str
    tool: str
    arguments: Any
    text: str
    form: str
    at: float
    expires: float


@dataclass(frozen=True)
class Form:
    """A command in one protocol's terms: `exact` as sent, `normal` in the protocol's
    normal form (either may be None when it has none). Forms compare by kind too.

    A normal form that costs a parse (SQL's) is given as `derive` and computed on first
    use (`normalised`): most requests match exactly, or have no tool call to match, and a
    statement's parse and deparse was a tenth of the gateway's time per SQL statement."""

    kind: str
    exact: Any
    normal: Any = None
    derive: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def normalised(self) -> Any:
        if self.derive is not None:
            object.__setattr__(self, "normal", self.derive())
            object.__setattr__(self, "derive", None)
        return self.normal


Key = tuple[str, str, str]


def key_of(principal: Principal) -> Key:
    """Whose tool calls these are: the verified principal and the crew run it names."""
    return principal.issuer, principal.subject, principal.attribute("run")


def current(newest_first: Iterable[Asked], now: float, per_key: int = PER_KEY) -> list[Asked]:
    """Of the `per_key` newest calls remembered for one principal and run, those not yet
    expired, newest first: what both the ledger and the store's `tool_calls` answer."""
    return [a for a in islice(newest_first, per_key) if a.expires > now]


class Ledger:
    """The tool calls models recently asked for, per principal and run: bounded, expiring."""

    def __init__(self, per_key: int = PER_KEY, keys: int = KEYS) -> None:
        self.per_key, self.keys = per_key, keys
        self.calls: OrderedDict[Key, deque[Asked]] = OrderedDict()

    def remember(self, key: Key, asked: Iterable[Asked]) -> None:
        kept = self.calls.pop(key, None) or deque(maxlen=self.per_key)
        kept.extend(asked)
        self.calls[key] = kept
        while len(self.calls) > self.keys:
            self.calls.popitem(last=False)

    def recent(self, key: Key, now: float | None = None) -> list[Asked]:
        """The calls still remembered for `key`, newest first."""
        now = time.time() if now is None else now
        kept = self.calls.get(key)
        if not kept:
            return []
        found = current(reversed(kept), now, self.per_key)
        if not found:
            del self.calls[key]
        return found

    def forget(self, event: str) -> None:
        """Drop the calls of a completion that did not make it onto the record."""
        for key, kept in list(self.calls.items()):
            left = deque((a for a in kept if a.event != event), maxlen=self.per_key)
            if left:
                self.calls[key] = left
            else:
                del self.calls[key]


def match(command: list[Form], asked: list[Asked],
          forms: Callable[[Asked], Iterable[Form]]) -> tuple[Asked, str] | None:
    """The newest call that asked for `command` exactly, else the newest that asked for it
    in normal form, else None."""
    best: tuple[Asked, str] | None = None
    for a in asked:
        for f in forms(a):
            for c in command:
                if f.kind != c.kind:
                    continue
                if f.exact is not None and f.exact == c.exact:
                    return a, EXACT
                if best is None and (normal := f.normalised()) is not None and normal == c.normalised():
                    best = (a, NORMALISED)
    return best


def asserted(principal: Principal) -> dict[str, str]:
    """What the request says about the model and prompt it acts for (verified or not)."""
    return {n: principal.attribute(n) for n in ("model", "prompt") if principal.attribute(n)}


def verified(a: Asked, how: str, principal: Principal) -> dict[str, Any]:
    """The provenance of a request a model asked for."""
    said = asserted(principal)
    return {"match": how, "event": a.event, "flow": a.flow, "connection": a.connection, "model": a.model,
            "tool_call": a.call, "tool": a.tool, "arguments": a.arguments, "form": a.form,
            "completion": a.text[:EXCERPT], **({"asserted": said} if said else {})}


def unverified(principal: Principal, remembered: int, everywhere: bool = True) -> dict[str, Any]:
    """The provenance of a command no model output asked for. `everywhere`: every replica's
    tool calls were looked at; otherwise only this replica's (no rule asks about provenance,
    so the store is not read), and the reason says so."""
    said = asserted(principal)
    reason = (NOTHING_ASKED if everywhere else NOTHING_ASKED_HERE) + (
        f" ({remembered} tool calls of this principal and run remembered; none asked for this)" if remembered
        else " (no tool calls of this principal and run remembered)")
    if not everywhere:
        reason += "; other replicas' tool calls are looked up only while a rule asks about provenance"
    return {"match": NONE, "reason": reason, **({"asserted": said} if said else {})}


def unknown(why: str, principal: Principal) -> dict[str, Any]:
    """The provenance of a command this replica has no model output for, when the store that
    would say whether another replica's model asked for it cannot be read."""
    said = asserted(principal)
    return {"match": UNKNOWN, "reason": f"no model output seen by this replica asked for it, and the audit store, "
                                        f"which holds the other replicas' tool calls, could not be read ({why})",
            **({"asserted": said} if said else {})}


def not_applicable() -> dict[str, Any]:
    return {"match": NOT_APPLICABLE}
