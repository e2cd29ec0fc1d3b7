"""MCP for tests: the sample ticket-desk server (examples/sample_mcp.py, the official SDK)
as a real process, the official SDK's client through a real gateway, and raw JSON-RPC over
requests for what no well-behaved client would send."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import requests
from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.support.gateway import ROOT, Gateway
from tests.support.servers import stop_process

SAMPLE = ROOT / "examples" / "sample_mcp.py"
ACCEPT = "application/json, text/event-stream"


class TicketDesk:
    """examples/sample_mcp.py on a free port; `log` is what reached it (HTTP requests and
    tool runs, one JSON line each)."""

    def __init__(self, directory: Path, token: str, secret: str, *args: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        (directory / "token").write_text(token)
        (directory / "secret").write_text(secret)
        self.log_file = directory / "received.jsonl"
        self.log_file.write_text("")
        self.output = open(directory / "server.out", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(SAMPLE), "--port", "0", "--token-file", str(directory / "token"),
             "--secret-file", str(directory / "secret"), "--log", str(self.log_file), *args],
            stdout=subprocess.PIPE, stderr=self.output, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line.startswith("sample MCP server on "):
            raise RuntimeError(f"the sample MCP server did not start: {line}{(directory / 'server.out').read_text()}")
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def received(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def posts(self) -> list[dict[str, Any]]:
        """The JSON-RPC bodies that reached the server over HTTP."""
        return [json.loads(e["body"]) for e in self.received() if e.get("http") == "POST" and e["body"]]

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        """The tools that ran."""
        return [e for e in self.received() if "tool" in e and tool in (None, e["tool"])]

    def stop(self) -> None:
        stop_process(self.proc)
        self.output.close()


def client_factory(gw: Gateway, token: str):
    """An httpx client factory for the SDK: through the gateway as a proxy, the agent's token in it."""

    def make(headers: dict | None = None, timeout: httpx.Timeout | None = None, auth=None) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=gw.proxy_url(token), trust_env=False, headers=headers, auth=auth,
                                 timeout=timeout or httpx.Timeout(30, read=120))

    return make


@contextlib.asynccontextmanager
async def session(gw: Gateway, token: str, url: str, *, legacy: bool = False, **callbacks) -> AsyncIterator[ClientSession]:
    """An initialized MCP ClientSession of the official SDK through the gateway (Streamable
    HTTP, or the older HTTP+SSE transport)."""
    if legacy:
        transport = sse_client(url, httpx_client_factory=client_factory(gw, token), timeout=30)
    else:
        client = client_factory(gw, token)()
        transport = _streamable(client, url)
    async with transport as streams:
        async with ClientSession(streams[0], streams[1], **callbacks) as s:
            await s.initialize()
            yield s


@contextlib.asynccontextmanager
async def _streamable(client: httpx.AsyncClient, url: str):
    async with client, streamable_http_client(url, http_client=client) as streams:
        yield streams


class Raw:
    """JSON-RPC over plain HTTP through the gateway: what a misbehaving client sends."""

    def __init__(self, gw: Gateway, token: str, url: str) -> None:
        self.http, self.url = gw.session(token), url
        self.sid = ""

    def post(self, body: Any, sid: str | None = None, raw: bytes | None = None) -> requests.Response:
        headers = {"accept": ACCEPT, "content-type": "application/json"}
        if sid if sid is not None else self.sid:
            headers["mcp-session-id"] = sid if sid is not None else self.sid
        return self.http.post(self.url, data=raw if raw is not None else json.dumps(body), headers=headers, timeout=60)

    def initialize(self) -> str:
        r = self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}, sid="")
        assert r.status_code == 200, r.text
        self.sid = r.headers["mcp-session-id"]
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
        return self.sid


def messages(r: requests.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an answer, whether JSON or an event stream."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    document = r.json()
    return document if isinstance(document, list) else [document]


def answer(r: requests.Response) -> dict[str, Any]:
    """The one answer (a response, not a notification) of an MCP POST."""
    found = [m for m in messages(r) if "method" not in m]
    assert len(found) == 1, r.text
    return found[0]


class Background:
    """Run `fn` in a thread (a call the gateway holds) and collect what it returned or raised."""

    def __init__(self, fn) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # the test asserts on it
            self.error = e

    def join(self, timeout: float = 60) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still held"
        if self.error is not None:
            raise self.error
        return self.result
