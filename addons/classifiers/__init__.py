"""The protocol classifiers: one module per connection kind, looked up by kind.

Each module turns a request into an Operation with the same signature,
`from_request(connection: str, request: Request) -> Operation`, and knows nothing of
mitmproxy: classifiers depend only on the engines (and HTTP's path and body rules, which
the protocols carried over HTTP share). Adding a protocol is one module plus one line in
CLASSIFIERS.
"""

from __future__ import annotations

from collections.abc import Callable

from addons.classifiers import http, kubernetes, llm, mcp, postgres, ssh
from addons.engine.model import Operation, Request

Classifier = Callable[[str, Request], Operation]

CLASSIFIERS: dict[str, Classifier] = {
    "http": http.from_request,
    "gateway": http.from_request,  # the gateway's own API (approvals) is plain HTTP
    "kubernetes": kubernetes.from_request,
    "postgres": postgres.from_request,
    "ssh": ssh.from_request,
    "mcp": mcp.from_request,
    "llm": llm.from_request,
}


def classify(kind: str, connection: str, request: Request) -> Operation:
    """The Operation for a request to a connection of `kind`."""
    return CLASSIFIERS[kind](connection, request)
