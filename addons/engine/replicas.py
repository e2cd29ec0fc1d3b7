"""Gateway replicas: who this process is, whose lease lapsed, and whether they agree.

Every gateway process is a replica with an identity of its own (a new one each start) and
a lease in the audit store: a heartbeat row, renewed in the database's clock, naming what
it runs (hashes of its rule set and configuration). A replica holding a flow for approval
is the only one that may run it; when that replica is gone, the others abandon the
approval, so nobody ever runs it later. Pure functions: the approval book, the replica
addon and `custody status` share them.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

RESTARTED = "the gateway restarted while the request was held"
STOPPED = "the gateway was stopped while the request was held"


@dataclass(frozen=True)
class Identity:
    """One gateway process: `id` is what its events and approvals record."""

    id: str
    host: str
    pid: int
    started: float

    @classmethod
    def new(cls) -> Identity:
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host}-{pid}-{os.urandom(3).hex()}", host, pid, time.time())


def running(pid: int | None) -> bool:
    """Is a process with this id running on this host?"""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def lapsed(holder: dict, lease: float, host: str, trust_age: bool, starting: bool = False) -> str | None:
    """Why the replica holding an approval can no longer answer for it (the outcome the
    approval is abandoned with), or None while it may still. `holder` is a row of
    AuditStore.held_elsewhere; `starting`: the one judging is a gateway starting up (to
    which a process of this host that is gone is its own previous life). A lapsed
    heartbeat counts only when `trust_age`: the one judging has itself reached the store
    for a whole lease, so a store outage that silenced every replica's heartbeat is not
    taken for their death."""
    if holder["replica"] is None or holder["state"] is None:
        return RESTARTED  # held by a process from before replicas were recorded, or unknown to the store
    if holder["state"] == "stopped":
        return STOPPED
    lost = f"gateway replica {holder['replica']} was lost while the request was held"
    if holder["host"] == host and not running(holder["pid"]):
        return RESTARTED if starting else f"{lost} (its process is gone)"
    if trust_age and holder["age"] is not None and holder["age"] > lease:
        return f"{lost} (no heartbeat for {holder['age']:.0f}s)"
    if holder["state"] == "reconciled":  # another replica found it gone (the why above, when this one can tell)
        return f"{lost} (its flows were reconciled)"
    return None


def live(replicas: list[dict], lease: float) -> list[dict]:
    """The replicas whose lease holds."""
    return [r for r in replicas if r["state"] not in ("stopped", "reconciled") and r["age"] is not None
            and r["age"] <= lease]


def disagreements(replicas: list[dict]) -> list[str]:
    """What the live replicas do not agree on: their rule sets, their configurations."""
    out = []
    for column, what in (("rules", "rule sets"), ("config", "configurations")):
        seen = sorted({r[column] or "-" for r in replicas})
        if len(seen) > 1:
            by = "; ".join(f"{h[:12]}: {', '.join(r['id'] for r in replicas if (r[column] or '-') == h)}" for h in seen)
            out.append(f"the live replicas run {len(seen)} different {what} ({by})")
    return out
