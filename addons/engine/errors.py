"""The error codes of Custody's refusals: the `error` field of every JSON refusal body.

Clients and the bridges depend on these strings (pg_bridge maps them to SQLSTATEs, the
approvals page and CLI show them), so they are one table, and a refusal names a member of
it rather than spelling a literal. docs/design.md lists what each means to an agent.
"""

from __future__ import annotations

from enum import StrEnum


class Error(StrEnum):
    # identity
    UNAUTHENTICATED = "unauthenticated"  # no token, or one that did not verify (401/407)
    # classify
    UNKNOWN_CONNECTION = "unknown_connection"  # not a registered connection: never an open proxy
    MISDIRECTED_REQUEST = "misdirected_request"  # Host, SNI or request target disagree
    AMBIGUOUS_PATH = "ambiguous_path"  # a path servers may resolve differently
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # an upgrade or protocol the gateway cannot govern
    INTERACTIVE_PROGRAM = "interactive_program"  # an editor, pager or top: a line-based gate cannot govern its keys
    MALFORMED_HEADERS = "malformed_headers"  # a header form a proxy must reject (obs-fold, controls, two Hosts)
    INVALID_MESSAGE = "invalid_message"  # an MCP body that is not valid JSON-RPC 2.0 (or not valid MCP)
    # MCP sessions and tools
    UNKNOWN_SESSION = "unknown_session"  # an Mcp-Session-Id this principal did not open (or that ended)
    TOOL_CHANGED = "tool_changed"  # a tool's definition differs from the one pinned
    # policy
    DENIED_BY_POLICY = "denied_by_policy"  # a deny rule matched
    NO_MATCHING_RULE = "no_matching_rule"  # nothing allows it: default deny
    # hold
    APPROVAL_PENDING = "approval_pending"  # the hold timed out; re-send once approved
    APPROVAL_DENIED = "approval_denied"
    APPROVAL_EXPIRED = "approval_expired"
    APPROVAL_ABANDONED = "approval_abandoned"  # the client went away, or the gateway restarted
    APPROVAL_USED = "approval_used"  # an approval runs one request, once
    APPROVAL_MISMATCH = "approval_mismatch"  # the request changed while it was held
    JUSTIFICATION_REQUIRED = "justification_required"  # the review rule wants the agent to say why
    # masking
    MASKING_REFUSED = "masking_refused"  # the response cannot be masked (type, size, shape)
    MASKING_UNAVAILABLE = "masking_unavailable"  # masking could not run: nothing unmasked is sent
    # recorder
    AUDIT_UNAVAILABLE = "audit_unavailable"  # the audit store could not record it
    # the gateway itself
    GATEWAY_ERROR = "gateway_error"  # an addon failed; the flow was refused
    NOT_CLEARED = "not_cleared"  # the gate: no allow decision on record
    EDITED_IN_CONSOLE = "edited_in_console"  # an operator edited the request; it went as theirs
    # the approvers' API
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REASON_REQUIRED = "reason_required"
    NOT_PENDING = "not_pending"
    NOT_APPROVED = "not_approved"
    SELF_APPROVAL = "self_approval"
    ALREADY_VOTED = "already_voted"
    NOT_AN_APPROVER = "not_an_approver"
    GRANT_NOT_ALLOWED = "grant_not_allowed"  # no rule allows a grant that long (or at all)
    GRANT_ENDED = "grant_ended"  # the grant was revoked or ran out already
    # approvers' sign-in and channels
    SIGNIN_FAILED = "signin_failed"  # an SSO sign-in that did not verify (state, nonce, PKCE, token, assertion)
    CSRF_FAILED = "csrf_failed"  # a cookie-authenticated change without the session's CSRF token
    SLACK_UNVERIFIED = "slack_unverified"  # not signed by Slack: bad signature, stale timestamp, replayed
    UNMAPPED_USER = "unmapped_user"  # a Slack user bound to no approver identity


GATEWAY_FAILURES = frozenset({Error.MASKING_REFUSED, Error.MASKING_UNAVAILABLE, Error.GATEWAY_ERROR,
                              Error.NOT_CLEARED, Error.AUDIT_UNAVAILABLE})
"""Refusals that are the gateway's own failure, not a decision about the request."""
