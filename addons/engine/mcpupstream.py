"""The gateway's own messages to an MCP server: the answer to a request of the server's that
the gateway refused on the client's behalf (a sampling or elicitation request), so the
server's tool does not wait for an answer that will never come.

Blocking (urllib, no proxies from the environment): callers on an event loop run it in a
thread. Upstream TLS is verified against the connection's CA (else the system's).
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import certifi

from addons.engine.config import Connection

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def tls_context(conn: Connection) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=conn.ca_file or certifi.where())
    if conn.client_cert:
        context.load_cert_chain(conn.client_cert)
    return context


def post(conn: Connection, target: str, headers: dict[str, str], message: dict[str, Any], timeout: float = 10) -> int:
    """POST one JSON-RPC message to the connection's upstream at `target` (path and query);
    the HTTP status the server answered with."""
    url = f"{conn.upstream.scheme}://{conn.upstream.host}:{conn.upstream.port}{target}"
    request = urllib.request.Request(url, data=json.dumps(message).encode(), method="POST", headers={
        "content-type": "application/json", "accept": "application/json, text/event-stream", **headers})
    handlers = [urllib.request.HTTPSHandler(context=tls_context(conn))] if conn.upstream.scheme == "https" else []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers) if handlers else _DIRECT
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
