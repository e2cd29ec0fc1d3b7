"""The error codes of Custody's refusals: the `error` field of every JSON refusal body.

Clients and the bridges depend on these strings (pg_bridge maps them to SQLSTATEs, the
approvals page and CLI show them), so they are one table, and a refusal names a member of
it rather than spelling a literal. docs/design.md lists what each means to an agent.
"""

from __future__ import annotations

from enum import StrEnum


class Error(StrEnum):
    # limits
    HEADERS_TOO_LARGE = "headers_too_large"  # more header lines or bytes than limits allow (431)
    # identity
    UNAUTHENTICATED = "unauthenticated"  # no token, or one that did not verify (401/407)
    # classify
    UNKNOWN_CONNECTION = "unknown_connection"  # not a registered connection: never an open proxy
    MISDIRECTED_REQUEST = "misdirected_request"  # Host, SNI or request target disagree
    WRONG_REPLICA = "wrong_replica"  # a bridge step for a session another replica holds (421): nothing ran
    AMBIGUOUS_PATH = "ambiguous_path"  # a path servers may resolve differently
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"  # an upgrade or protocol the gateway cannot govern
    INTERACTIVE_PROGRAM = "interactive_program"  # an editor, pager or top: a line-based gate cannot govern its keys
    MALFORMED_HEADERS = "malformed_headers"  # a header form a proxy must reject (obs-fold, controls, two Hosts)
    INVALID_MESSAGE = "invalid_message"  # an MCP body that is not valid JSON-RPC 2.0 (or not valid MCP)
    INVALID_MODEL_REQUEST = "invalid_model_request"  # a body that is not a request of the llm connection's API
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
    # model traffic
    INVALID_COMPLETION = "invalid_completion"  # the model server's answer is not a completion of its API
    PROVENANCE_UNKNOWN = "provenance_unknown"  # the store holding other replicas' tool calls could not be read
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
                              Error.NOT_CLEARED, Error.AUDIT_UNAVAILABLE, Error.INVALID_COMPLETION,
                              Error.PROVENANCE_UNKNOWN})
"""Refusals that are the gateway's own failure, not a decision about the request."""


HINTS: dict[Error, str] = {
    Error.UNAUTHENTICATED: "send the agent's token (HTTPS_PROXY=http://agent:TOKEN@gateway, a kubeconfig from "
                           "`custody kubeconfig`, or the token as the database or ssh password); when it expired, "
                           "get a fresh one",
    Error.UNKNOWN_CONNECTION: "the gateway reaches only registered connections: ask an operator to register it",
    Error.MISDIRECTED_REQUEST: "send the request to the host the tunnel or request line names",
    Error.WRONG_REPLICA: "the bridges open another connection until the balancer reaches the session's replica",
    Error.AMBIGUOUS_PATH: "send the path as the server will resolve it (no '.', '..' or backslashes)",
    Error.MALFORMED_HEADERS: "send each header on one line, without control characters, and one Host",
    Error.UNSUPPORTED_PROTOCOL: "use a protocol the gateway can govern (HTTP/1.1, HTTP/2 over TLS, WebSocket "
                                "for Kubernetes exec)",
    Error.DENIED_BY_POLICY: "a rule refuses this; `custody rules explain` shows which",
    Error.NO_MATCHING_RULE: "no rule allows this; `custody rules explain` shows the rules that could",
    Error.INTERACTIVE_PROGRAM: "run a non-interactive command (cat or head instead of a pager, sed instead of an "
                               "editor)",
    Error.APPROVAL_PENDING: "re-send the identical request once it is approved (`custody approvals show ID`)",
    Error.APPROVAL_DENIED: "the approvers refused it; the reason says why",
    Error.APPROVAL_EXPIRED: "nobody decided in time; send it again to ask again",
    Error.APPROVAL_ABANDONED: "send it again to ask again",
    Error.APPROVAL_USED: "an approval runs one request, once; send it again to ask again",
    Error.APPROVAL_MISMATCH: "send, unchanged, the request you want approved",
    Error.MASKING_REFUSED: "the answer cannot be masked as the rules require; ask for JSON or text, or less of it",
    Error.MASKING_UNAVAILABLE: "nothing unmasked was sent; retry shortly",
    Error.AUDIT_UNAVAILABLE: "it could not be recorded, so nothing was forwarded; retry shortly",
    Error.PROVENANCE_UNKNOWN: "the gateway could not tell which model output asked for this (its audit store "
                              "did not answer), so nothing was forwarded; retry shortly",
    Error.GATEWAY_ERROR: "nothing was forwarded; retry, and give an operator the audit event id",
    Error.NOT_CLEARED: "nothing was forwarded; give an operator the audit event id",
}
"""What an agent can do about a refusal: JSON bodies carry it as `hint`, PostgreSQL errors as HINT."""
