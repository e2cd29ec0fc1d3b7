"""The approval record: the review of one exact operation, from request to execution.

An Approval is bound to a fingerprint of the principal, the connection and the exact
request (method, normalised URL, body digest). Its life:

    pending ──quorum──▶ approved ──executed once──▶ executed
       │  └─denials──▶ denied          └──ttl──▶ expired (never used)
       ├──ttl──▶ expired
       └──client gone while held──▶ abandoned

Votes come from principals named by the rules' approvers (`group:…`, `subject:…`); the
requester, or anyone presenting the requester's token, can never vote; one approver counts
once; every review rule that matched must reach its own quorum, and any one reaching its
denial count denies. The approval book (addons/approvalbook.py) changes them, each change under the
approval's row lock in the audit store (so every replica sees one history); this module is
the record itself and the rules of voting, as pure code.
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from addons.engine.errors import Error
from addons.engine.model import Operation, Principal, Review, canonical_json

PENDING, APPROVED, DENIED, EXPIRED, ABANDONED, EXECUTED = (
    "pending", "approved", "denied", "expired", "abandoned", "executed",
)
LIVE = (PENDING, APPROVED)
CONSOLE = "console-operator"


class ApprovalError(Exception):
    """A vote or lookup that cannot be done: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


def fingerprint(principal: Principal, connection: str, method: str, url: str, headers: list[list[str]],
                body: bytes) -> str:
    """What an approval is bound to: who, where, and the exact request: method, URL as
    sent, every header that reaches the upstream, and the body."""
    return hashlib.sha256(
        canonical_json({
            "subject": principal.subject,
            "issuer": principal.issuer,
            "connection": connection,
            "method": method.upper(),
            "url": url,
            "headers": sorted([k.lower(), v] for k, v in headers),
            "body": hashlib.sha256(body).hexdigest(),
        }).encode()
    ).hexdigest()


def eligible(review: Review, subject: str, groups: tuple[str, ...]) -> bool:
    for approver in review.approvers:
        kind, _, name = approver.partition(":")
        if kind == "group" and name in groups:
            return True
        if kind == "subject" and fnmatch.fnmatchcase(subject, name):
            return True
    return False


@dataclass
class Vote:
    approver: str
    issuer: str
    groups: list[str]
    vote: str  # approve | deny
    reason: str
    at: float
    via: str = "api"  # api | console | slack
    grant: float = 0.0
    """Seconds of a time-boxed grant this approving vote asks for (0: this request only)."""


def tally(reviews: list[Review], votes: list[Vote]) -> str:
    """approved when every review has its quorum, denied when any has its denials."""
    if any(v.via == "console" for v in votes):
        return APPROVED if votes[-1].vote == "approve" else DENIED
    outcome = APPROVED
    for review in reviews:
        counted = [v for v in votes if eligible(review, v.approver, tuple(v.groups))]
        if sum(v.vote == "deny" for v in counted) >= review.denials:
            return DENIED
        if sum(v.vote == "approve" for v in counted) < review.approvals:
            outcome = PENDING
    return outcome


def describe(approval: Approval, outcome: str) -> str:
    """"approved by alice, bob" / "denied by carol: too many units"."""
    wanted = "approve" if outcome == APPROVED else "deny"
    votes = [v for v in approval.votes if v.vote == wanted]
    reasons = "; ".join(v.reason for v in votes if v.reason)
    verb = "approved" if outcome == APPROVED else "denied"
    return f"{verb} by {', '.join(v.approver for v in votes)}" + (f": {reasons}" if reasons else "")


@dataclass
class Approval:
    id: str
    state: str
    created: float
    requester: Principal
    operation: Operation
    request: dict[str, Any]
    fingerprint: str
    rules: list[str]
    reason: str
    reviews: list[Review]
    hold_until: float
    expires: float
    held: bool = True
    votes: list[Vote] = field(default_factory=list)
    decided: float | None = None
    executed: float | None = None
    outcome: str = ""
    flow: str = ""
    session: str = ""
    replica: str = ""
    """The gateway replica holding the approval's flow (the only one that may run it while held)."""
    grant: dict[str, Any] | None = None
    """The time-boxed grant this approval issued (addons/engine/grants.py), as it stands now."""

    @property
    def connection(self) -> str:
        return self.operation.connection

    def approvers(self) -> list[str]:
        return sorted({a for r in self.reviews for a in r.approvers})

    def document(self) -> dict[str, Any]:
        return {
            **shown(self.operation, self.request),
            "justification": self.requester.attribute("justification"),
            "id": self.id,
            "state": self.state,
            "created": self.created,
            "requester": self.requester.as_dict(),
            "connection": self.connection,
            "operation": self.operation.as_dict(),
            "request": self.request,
            "fingerprint": self.fingerprint,
            "rules": self.rules,
            "reason": self.reason,
            "reviews": [r.as_dict() for r in self.reviews],
            "approvers": self.approvers(),
            "hold_until": self.hold_until,
            "expires": self.expires,
            "held": self.held,
            "votes": [asdict(v) for v in self.votes],
            "decided": self.decided,
            "executed": self.executed,
            "outcome": self.outcome,
            "flow": self.flow,
            "session": self.session,
            "replica": self.replica,
            "grant": self.grant,
        }

    @classmethod
    def from_document(cls, d: dict[str, Any]) -> Approval:
        p = d["requester"]
        return cls(
            id=d["id"],
            state=d["state"],
            created=d["created"],
            requester=Principal(p["subject"], p["issuer"], tuple(p["groups"]), p["agent"], p["asserted"],
                                p["token_id"], p["token_fingerprint"]),
            operation=Operation.from_dict(d["operation"]),
            request=d["request"],
            fingerprint=d["fingerprint"],
            rules=d["rules"],
            reason=d["reason"],
            reviews=[Review.from_dict(r) for r in d["reviews"]],
            hold_until=d["hold_until"],
            expires=d["expires"],
            held=d["held"],
            votes=[Vote(**v) for v in d["votes"]],
            decided=d["decided"],
            executed=d["executed"],
            outcome=d["outcome"],
            flow=d["flow"],
            session=d["session"],
            replica=d.get("replica", ""),
            grant=d.get("grant"),
        )

    def refresh(self, document: dict[str, Any]) -> Approval:
        """Take on the state the store holds now (another replica may have changed it)."""
        self.__dict__.update(vars(Approval.from_document(document)))
        return self

    def finish(self, state: str, why: str) -> None:
        """Decided (approved, denied) or ended (expired, abandoned): an approved hold stays
        its held flow's until that flow runs it."""
        self.state, self.outcome, self.decided = state, why, time.time()
        if state != APPROVED:
            self.held = False


DETAIL_LENGTH = 240


def shown(op: Operation, request: dict[str, Any]) -> dict[str, Any]:
    """What tells this request from others like it, for approvers: `detail`, one line for a
    list (the body, the statement and its row estimate, the command line, the object),
    `statement`, the SQL or command line itself for protocols whose HTTP request is only the
    bridge's envelope (None for HTTP and Kubernetes, whose request is shown as it is), and
    `provenance`, the model output that asked for it (or why none did)."""
    return {**_shown(op, request), "provenance": asked_by(op)}


def asked_by(op: Operation) -> dict[str, Any] | None:
    """The model output behind a request, for approvers: which model, which tool call and
    what it wrote, how it matched the request; or that no model output asked for it."""
    found = op.details.get("provenance")
    if not isinstance(found, dict) or found.get("match") in (None, "n/a"):
        return None
    keys = ("match", "model", "connection", "tool", "tool_call", "completion", "event", "reason", "asserted")
    return {k: found[k] for k in keys if k in found}


def _shown(op: Operation, request: dict[str, Any]) -> dict[str, Any]:
    d = op.details
    statement = None
    if op.protocol == "postgres":
        statement = "; ".join(p.details.get("sql", "") for p in op.parts) if op.parts else d.get("sql")
        rows = [p.details["rows"] for p in op.parts or (op,) if p.details.get("rows") is not None]
        detail = (statement or op.summary) + (f" (planner: ~{sum(rows)} rows)" if rows else "")
    elif op.protocol == "ssh":
        statement = d.get("line") or None
        detail = statement or op.summary
    elif op.protocol == "kubernetes":
        where = f" in {d['namespace']}" if d.get("namespace") else ""
        detail = f"{d.get('verb', '')} {d.get('resource', '')}{'/' + d['name'] if d.get('name') else ''}{where}".strip()
    else:
        body = request.get("body") or ""
        detail = " ".join(str(body).split()) or d.get("query") or op.summary
    return {"detail": detail[:DETAIL_LENGTH], "statement": statement}


def visible(approval: Approval, who: Principal) -> bool:
    """Approvals show request bodies: only their approvers and their requester see them."""
    requester = approval.requester
    return (who.subject, who.issuer) == (requester.subject, requester.issuer) or any(
        eligible(r, who.subject, who.groups) for r in approval.reviews
    )


def check_vote(approval: Approval, voter: Principal) -> None:
    """Raise ApprovalError unless `voter` may vote on `approval` now."""
    if approval.state != PENDING:
        raise ApprovalError(409, Error.NOT_PENDING, f"approval {approval.id} is {approval.state}, not pending")
    requester = approval.requester
    if (voter.subject, voter.issuer) == (requester.subject, requester.issuer) or (
        voter.token_fingerprint and voter.token_fingerprint == requester.token_fingerprint
    ):
        raise ApprovalError(403, Error.SELF_APPROVAL, "the requester cannot approve or deny their own request")
    if any((v.approver, v.issuer) == (voter.subject, voter.issuer) for v in approval.votes):
        raise ApprovalError(409, Error.ALREADY_VOTED, f"{voter.subject} has already voted on approval {approval.id}")
    if not any(eligible(r, voter.subject, voter.groups) for r in approval.reviews):
        raise ApprovalError(
            403, Error.NOT_AN_APPROVER,
            f"{voter.subject} is not an approver for this request (approvers: {', '.join(approval.approvers())})",
        )
