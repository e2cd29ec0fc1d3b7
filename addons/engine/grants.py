"""Time-boxed grants: an approver's answer "allow this principal this operation's shape for
N minutes" (what hoop calls just-in-time access), as pure code.

A grant is issued by an approval whose approving votes all asked for one (the shortest
asked for wins), bounded by the review rules that held the request (`review.grants.max`;
a rule without it allows none). Its shape is the held operation's connection, action and
resource, for the principal that asked (subject and issuer), and the review rules that
held it: a later request is covered only when the same rules hold it again for review
(a deny rule still denies: deny beats review, and only a review reaches a grant) and its
shape is the same. Covered requests go through without a new hold, each recorded with
the grant it used; a grant can be revoked by any approver of its rules. The grant is part
of the approval that issued it (its document's `grant`), changed by that approval's steps
(addons/approvalbook.py); this module is the record and the rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from addons.engine.approval import Approval, ApprovalError, eligible
from addons.engine.errors import Error
from addons.engine.model import Operation, Principal, Review, new_id

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"


def grant_limit(reviews: list[Review]) -> float:
    """The longest grant every one of `reviews` allows (0: at least one allows none)."""
    return min((r.grant_max for r in reviews), default=0.0)


def check_grant(reviews: list[Review], seconds: float) -> None:
    """Raise ApprovalError unless the rules allow a grant of `seconds`."""
    limit = grant_limit(reviews)
    if seconds <= 0:
        raise ApprovalError(400, Error.GRANT_NOT_ALLOWED, "a grant lasts a positive time, e.g. \"30m\"")
    if limit <= 0:
        raise ApprovalError(400, Error.GRANT_NOT_ALLOWED, "the rules that held this request allow no grants")
    if seconds > limit:
        raise ApprovalError(400, Error.GRANT_NOT_ALLOWED,
                            f"the rules that held this request allow grants of at most {limit:g}s")


@dataclass
class Grant:
    id: str
    approval: str
    subject: str
    issuer: str
    connection: str
    action: str
    resource: str
    rules: list[str]
    reviews: list[Review]
    created: float
    expires: float
    granted_by: list[str]
    revoked: float | None = None
    revoked_by: str = ""
    reason: str = ""

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return REVOKED if self.revoked is not None else EXPIRED if self.expires <= now else ACTIVE

    def covers(self, principal: Principal, operation: Operation, rules: tuple[str, ...], now: float) -> bool:
        """Is this request — by `principal`, doing `operation`, held by `rules` — inside the grant?"""
        return (self.state(now) == ACTIVE
                and (principal.subject, principal.issuer) == (self.subject, self.issuer)
                and (operation.connection, operation.action, operation.resource)
                == (self.connection, self.action, self.resource)
                and bool(rules) and set(rules) <= set(self.rules))

    def may_revoke(self, who: Principal) -> bool:
        return any(eligible(r, who.subject, who.groups) for r in self.reviews)

    def visible(self, who: Principal) -> bool:
        return (who.subject, who.issuer) == (self.subject, self.issuer) or self.may_revoke(who)

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id, "approval": self.approval, "state": self.state(),
            "principal": {"subject": self.subject, "issuer": self.issuer},
            "shape": {"connection": self.connection, "action": self.action, "resource": self.resource},
            "rules": self.rules, "reviews": [r.as_dict() for r in self.reviews],
            "created": self.created, "expires": self.expires, "granted_by": self.granted_by,
            "revoked": self.revoked, "revoked_by": self.revoked_by, "reason": self.reason,
        }

    @classmethod
    def from_document(cls, d: dict[str, Any]) -> Grant:
        shape, who = d["shape"], d["principal"]
        return cls(d["id"], d["approval"], who["subject"], who["issuer"], shape["connection"], shape["action"],
                   shape["resource"], d["rules"], [Review.from_dict(r) for r in d["reviews"]], d["created"],
                   d["expires"], d["granted_by"], d["revoked"], d["revoked_by"], d["reason"])


def issued(approval: Approval, now: float) -> Grant | None:
    """The grant an approval issues when it is approved: only when every approving vote
    asked for one; it lasts the shortest time asked for, from now."""
    approving = [v for v in approval.votes if v.vote == "approve"]
    if not approving or not all(v.grant > 0 for v in approving):
        return None
    op, who = approval.operation, approval.requester
    return Grant(id=new_id(), approval=approval.id, subject=who.subject, issuer=who.issuer,
                 connection=op.connection, action=op.action, resource=op.resource, rules=list(approval.rules),
                 reviews=list(approval.reviews), created=now, expires=now + min(v.grant for v in approving),
                 granted_by=[v.approver for v in approving])
