"""Real HTTP(S) servers for tests: an upstream that records what reached it, and a JWKS
endpoint (with OIDC discovery) whose keys can be rotated and which can be taken down."""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from examples.samples.processes import free_port, stop_process, wait_listening  # noqa: F401  (tests use them from here too)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Background:
    """Runs an HTTP server on 127.0.0.1 (optionally TLS) in a thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: tuple[Path, Path] | None = None) -> None:
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.owner = self  # type: ignore[attr-defined]
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Route:
    """A canned answer: a body, or chunks sent one by one (chunked encoding) as the test
    releases them (`gates[i]` is waited on before chunk i, when given)."""

    content_type: str
    body: bytes = b""
    chunks: list[bytes] | None = None
    gates: dict[int, threading.Event] | None = None
    length: int | None = None  # announce this content-length instead of the real one
    headers: tuple[tuple[str, str], ...] = ()  # more response headers, sent as given


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _canned(self, route: Route) -> None:
        self.send_response(200)
        self.send_header("content-type", route.content_type)
        for name, value in route.headers:
            self.send_header(name, value)
        if route.chunks is None:
            self.send_header("content-length", str(route.length if route.length is not None else len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for n, chunk in enumerate(route.chunks):
            if route.gates and n in route.gates:
                route.gates[n].wait(30)
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        owner: Upstream = self.server.owner  # type: ignore[attr-defined]
        got = Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        owner.received.append(got)
        route = owner.routes.get(self.path.split("?")[0])
        if route is not None:
            self._canned(route)
            return
        document = owner.reply(got)
        payload = json.dumps(document).encode()
        self.send_response(document.get("_status", 200) if isinstance(document, dict) else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def log_message(self, *args) -> None:
        pass


class Upstream(Background):
    """An API server that records every request that reached it and echoes it back."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.received: list[Received] = []
        self.routes: dict[str, Route] = {}
        super().__init__(_UpstreamHandler, tls)

    def reply(self, got: Received) -> Any:
        return {"method": got.method, "path": got.path, "headers": got.headers, "body": got.body.decode(errors="replace")}


class _JwksHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        owner: JwksServer = self.server.owner  # type: ignore[attr-defined]
        owner.hits += 1
        if owner.down:
            self.send_response(503)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if self.path == "/.well-known/openid-configuration":
            document: Any = {"issuer": owner.issuer, "jwks_uri": f"{owner.url}/jwks.json"}
        elif self.path == "/jwks.json":
            document = {"keys": [k.jwk for k in owner.keys]}
        else:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        payload = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if owner.drip:  # an identity provider that answers a byte at a time
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(owner.drip)
            return
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


class JwksServer(Background):
    """An OIDC issuer's key endpoint. Set `.keys` to rotate, `.down = True` to fail,
    `.drip = seconds` to send each answer a byte at a time."""

    def __init__(self, keys: list) -> None:
        self.keys = list(keys)
        self.down = False
        self.drip = 0.0
        self.hits = 0
        super().__init__(_JwksHandler)
        self.url = f"http://127.0.0.1:{self.port}"
        self.issuer = self.url


class _ReceiverHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        owner: Receiver = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        owner.attempts += 1
        status = 500 if owner.failing else 200
        if not owner.failing:
            owner.received.append(json.loads(body))
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


class Receiver(Background):
    """A webhook receiver: keeps every JSON document POSTed to it (or fails them all)."""

    def __init__(self, failing: bool = False) -> None:
        self.received: list[Any] = []
        self.attempts = 0
        self.failing = failing
        super().__init__(_ReceiverHandler)
        self.url = f"http://127.0.0.1:{self.port}/hook"


class _TokenHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        import base64
        from urllib.parse import parse_qs

        owner: TokenEndpoint = self.server.owner  # type: ignore[attr-defined]
        form = parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
        try:
            client = base64.b64decode(self.headers.get("authorization", " ").split()[1]).decode()
        except (IndexError, ValueError):
            client = ""
        if client != owner.client or form.get("grant_type") != ["client_credentials"]:
            body, status = {"error": "invalid_client"}, 401
        else:
            body = {"access_token": owner.token or f"token-{len(owner.issued)}", "expires_in": owner.expires_in,
                    "token_type": "Bearer"}
            status = 200
            owner.issued.append(form)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass  # quiet: tests assert on what was issued


class TokenEndpoint(Background):
    """An OAuth 2.0 token endpoint for the client-credentials grant (RFC 6749 §4.4): it issues
    `token` (else token-0, token-1, …) to `client` ("id:secret" in HTTP Basic) and keeps the
    form of every grant it issued."""

    def __init__(self, client: str, token: str = "", expires_in: int = 61) -> None:
        self.client, self.token, self.expires_in = client, token, expires_in
        self.issued: list[dict] = []
        super().__init__(_TokenHandler)
        self.url = f"http://127.0.0.1:{self.port}/token"
