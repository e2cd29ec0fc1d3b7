"""Receivers for the audit sinks: a TCP (or TLS) syslog listener, an OTLP/HTTP logs
receiver, and the webhook receiver of tests/support/servers.py. Each can go down (an
outage) and come back on the same port, and keeps, in arrival order, the sequence number
of every audit event it took."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.support.servers import Background, Receiver

FRAME = re.compile(rb"(\d+) ")
SYSLOG = re.compile(r'^<(\d+)>1 (\S+) (\S+) (\S+) - (\S+) \[custody@32473 seq="(\d+)" id="([^"]+)" '
                    r'flow="([^"]*)" hash="([0-9a-f]{64})"\] \ufeff(.*)$', re.S)


class SyslogReceiver:
    """An RFC 5424 receiver over TCP with octet-counted framing (RFC 6587 3.4.1), as
    rsyslog's imtcp and syslog-ng's network() source read it; over TLS with `tls`. A
    message that does not parse fails the test (it is kept in `bad`)."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.tls = tls
        self.messages: list[dict] = []
        self.bad: list[bytes] = []
        self.port = 0
        self._lock = threading.Lock()
        self.up()

    @property
    def seqs(self) -> list[int]:
        with self._lock:
            return [m["seq"] for m in self.messages]

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        """An outage: no more connections, and those open are closed."""
        self.running = False
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: the port stops listening
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.tls:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
                try:
                    conn = context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    continue
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while (m := FRAME.match(buffer)) and len(buffer) >= m.end() + int(m.group(1)):
                end = m.end() + int(m.group(1))
                self._take(buffer[m.end():end])
                buffer = buffer[end:]

    def _take(self, raw: bytes) -> None:
        m = SYSLOG.match(raw.decode())
        if m is None:
            self.bad.append(raw)
            return
        event = json.loads(m.group(10))
        with self._lock:
            self.messages.append({"pri": int(m.group(1)), "ts": m.group(2), "app": m.group(4), "msgid": m.group(5),
                                  "seq": int(m.group(6)), "id": m.group(7), "flow": m.group(8),
                                  "hash": m.group(9), "event": event})


class _OtlpHandler(BaseHTTPRequestHandler):
    """POST /v1/logs with an ExportLogsServiceRequest in the JSON encoding, answered 200 with
    an empty ExportLogsServiceResponse, as the OpenTelemetry Collector's OTLP receiver does
    (opentelemetry-collector receiver/otlpreceiver/otlphttp.go `handleLogs`; the encoding is
    opentelemetry-proto's opentelemetry/proto/collector/logs/v1/logs_service.proto), or 503
    while it is down. A request that is not one gets 400 (and fails the test)."""

    def do_POST(self) -> None:
        owner: OtlpReceiver = self.server.owner  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if owner.failing:
            return self._answer(503, b'{"code": 14, "message": "unavailable"}')
        try:
            assert self.path == "/v1/logs" and self.headers.get("content-type") == "application/json"
            request = json.loads(body)
            records = [r for rl in request["resourceLogs"] for sl in rl["scopeLogs"] for r in sl["logRecords"]]
            for r in records:
                int(r["timeUnixNano"]), r["severityNumber"], r["body"]["stringValue"]
            owner.resources.extend(rl["resource"] for rl in request["resourceLogs"])
            owner.records.extend(records)
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            owner.bad.append(f"{type(e).__name__}: {e}")
            return self._answer(400, b'{"code": 3}')
        self._answer(200, b"{}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class OtlpReceiver(Background):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.resources: list[dict] = []
        self.bad: list[str] = []
        self.failing = False
        super().__init__(_OtlpHandler)
        self.url = f"http://127.0.0.1:{self.port}/v1/logs"

    @property
    def seqs(self) -> list[int]:
        return [int(next(a["value"]["intValue"] for a in r["attributes"] if a["key"] == "custody.seq"))
                for r in list(self.records)]

    def up(self) -> None:
        self.failing = False

    def down(self) -> None:
        self.failing = True


class WebhookReceiver(Receiver):
    @property
    def seqs(self) -> list[int]:
        return [e["seq"] for batch in list(self.received) for e in batch["events"]]

    def up(self) -> None:
        self.failing = False

    def down(self) -> None:
        self.failing = True


class FileReceiver:
    """The file a Vector or Fluent Bit file source tails. Its outage: the path is a
    directory for a while (the file moved aside, as a rotation would), so appends fail."""

    def __init__(self, path: Path) -> None:
        self.path, self.moved = path, path.with_suffix(".rotated")

    @property
    def seqs(self) -> list[int]:
        text = "".join(p.read_text() for p in (self.moved, self.path) if p.is_file())
        return [json.loads(line)["seq"] for line in text.splitlines()]

    def down(self) -> None:
        if self.path.exists():
            self.path.rename(self.moved)
        self.path.mkdir()

    def up(self) -> None:
        self.path.rmdir()
