"""Audit sinks: how a batch of audit events reaches a SIEM or a log shipper.

Each transport is blocking (the sinks addon runs it on a thread of its own, never on the
event loop) and `deliver` returns only once the receiver has taken the whole batch, or
raises; the cursor moves only after it returned, so a batch is delivered at least once.

- file: JSON lines appended, flushed and fsynced (Vector's or Fluent Bit's file input).
- stdout: JSON lines on the gateway's standard output.
- syslog: RFC 5424 messages over TCP, framed by octet counting (RFC 6587 3.4.1), or over
  TLS (RFC 5425). Syslog has no acknowledgement: a batch counts as delivered once the
  receiver's TCP stack acknowledged every byte (Linux SIOCOUTQ is 0); a receiver that
  dies with acknowledged bytes it has not read yet loses them (use otlp or webhook where
  that matters).
- otlp: OTLP/HTTP logs in the JSON encoding, POSTed to the collector's /v1/logs; any 2xx
  answer takes the batch (opentelemetry-proto's ExportLogsServiceRequest).
- webhook: `{"events": [...]}` POSTed as JSON; any 2xx answer takes the batch.

Every event goes out as the store holds it (`record`): every column but the body itself
(its digest and size are there), with the JSON columns as objects.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import ssl
import sys
import termios
import time
import urllib.request
from typing import Any, Protocol

from addons.engine.config import SinkConfig

JSON_COLUMNS = ("principal", "operation", "detail", "rules")
SYSLOG_ENTERPRISE = 32473
"""The SD-ID's private enterprise number: 32473 is the one RFC 5612 reserves for examples;
the structured data's name says whose it is (custody@32473)."""
SEVERITY = {"deny": 4, "review": 5}
"""Syslog severity by decision effect: warning for a denial, notice for a review, else informational."""


def record(row: dict[str, Any]) -> dict[str, Any]:
    """An event row as a sink ships it."""
    out = {k: v for k, v in row.items() if k != "body"}
    for column in JSON_COLUMNS:
        if isinstance(out.get(column), str):
            try:
                out[column] = json.loads(out[column])
            except ValueError:
                pass  # a plain text column (rules of old stores): kept as it is
    return out


def line(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"


class Transport(Protocol):
    def deliver(self, records: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    def __init__(self, cfg: SinkConfig) -> None:
        self.path = cfg.path

    def deliver(self, records: list[dict[str, Any]]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(b"".join(line(r) for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        pass


class StdoutSink:
    def __init__(self, cfg: SinkConfig) -> None:
        pass

    def deliver(self, records: list[dict[str, Any]]) -> None:
        out = sys.stdout.buffer
        out.write(b"".join(line(r) for r in records))
        out.flush()

    def close(self) -> None:
        pass


def sd_value(value: Any) -> str:
    """An SD-PARAM value, escaped as RFC 5424 6.3.3 says."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_frame(rec: dict[str, Any], hostname: str, app_name: str, facility: int) -> bytes:
    """One event as an RFC 5424 message, framed by its length (RFC 6587 octet counting)."""
    severity = SEVERITY.get(rec.get("effect") or "", 6)
    ts = datetime.datetime.fromtimestamp(rec["ts"], datetime.UTC).isoformat(timespec="microseconds")
    sd = (f'[custody@{SYSLOG_ENTERPRISE} seq="{rec["seq"]}" id="{sd_value(rec["id"])}" '
          f'flow="{sd_value(rec.get("flow") or "")}" hash="{rec["hash"]}"]')
    header = f"<{facility * 8 + severity}>1 {ts.replace('+00:00', 'Z')} {hostname} {app_name} - {rec['kind']} {sd} "
    message = header.encode() + b"\xef\xbb\xbf" + line(rec)[:-1]
    return f"{len(message)} ".encode() + message


class SyslogSink:
    """One connection, kept open between batches, opened again after a failure."""

    def __init__(self, cfg: SinkConfig) -> None:
        self.cfg = cfg
        self.hostname = socket.gethostname() or "-"
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        host, port = self.cfg.address
        sock = socket.create_connection((host, port), timeout=self.cfg.timeout)
        if self.cfg.tls:
            context = ssl.create_default_context(cafile=self.cfg.ca_file or None)
            sock = context.wrap_socket(sock, server_hostname=host)
        return sock

    def deliver(self, records: list[dict[str, Any]]) -> None:
        if self.sock is not None:
            try:
                self._still_open()
            except OSError:
                self.close()  # closed while idle (a receiver's idle timeout): connect again
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(b"".join(syslog_frame(r, self.hostname, self.cfg.app_name, self.cfg.facility)
                                       for r in records))
            self._acknowledged()
        except BaseException:
            self.close()
            raise

    def _acknowledged(self) -> None:
        """Wait until the receiver's TCP stack acknowledged everything sent; a receiver that
        closed or reset the connection meanwhile fails the batch."""
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            self._still_open()
            if fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0") == b"\0\0\0\0":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the syslog receiver did not take the batch within {self.cfg.timeout:g}s")
            time.sleep(0.005)

    def _still_open(self) -> None:
        """Raise if the receiver closed the connection (an end of stream) or reset it; the
        TCP bytes themselves are peeked at, under TLS too."""
        self.sock.setblocking(False)
        try:
            if socket.socket.recv(self.sock, 1, socket.MSG_PEEK) == b"":
                raise ConnectionError("the syslog receiver closed the connection")
        except BlockingIOError:
            pass  # nothing to read: the connection is open
        finally:
            self.sock.setblocking(True)
            self.sock.settimeout(self.cfg.timeout)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


def otlp_value(value: Any) -> dict[str, Any]:
    """An OTLP AnyValue in the JSON encoding (64-bit integers as strings)."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    return {"stringValue": value if isinstance(value, str) else json.dumps(value, default=str)}


OTLP_ATTRIBUTES = ("seq", "id", "kind", "flow", "session", "connection", "protocol", "subject", "effect",
                   "status", "approval", "hash", "prev_hash")
OTLP_SEVERITY = {"deny": (13, "WARN"), "review": (10, "INFO2")}


def otlp_request(records: list[dict[str, Any]], hostname: str) -> dict[str, Any]:
    """An ExportLogsServiceRequest: one resource (this gateway), one scope, a log record per event."""
    logs = []
    for rec in records:
        number, text = OTLP_SEVERITY.get(rec.get("effect") or "", (9, "INFO"))
        logs.append({
            "timeUnixNano": str(int(rec["ts"] * 1e9)), "observedTimeUnixNano": str(time.time_ns()),
            "severityNumber": number, "severityText": text, "eventName": f"custody.{rec['kind']}",
            "body": {"stringValue": line(rec)[:-1].decode()},
            "attributes": [{"key": f"custody.{k}", "value": otlp_value(rec[k])}
                           for k in OTLP_ATTRIBUTES if rec.get(k) not in (None, "")],
        })
    resource = [{"key": "service.name", "value": {"stringValue": "custody"}},
                {"key": "host.name", "value": {"stringValue": hostname}}]
    return {"resourceLogs": [{"resource": {"attributes": resource},
                              "scopeLogs": [{"scope": {"name": "custody.audit"}, "logRecords": logs}]}]}


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Straight to the receiver: never through a proxy the environment names (an agent's)."""


class HttpSink:
    """otlp and webhook: one POST per batch, taken by any 2xx answer."""

    def __init__(self, cfg: SinkConfig) -> None:
        self.cfg = cfg
        self.hostname = socket.gethostname()

    def body(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return otlp_request(records, self.hostname) if self.cfg.type == "otlp" else {"events": records}

    def deliver(self, records: list[dict[str, Any]]) -> None:
        headers = {"content-type": "application/json"}
        if self.cfg.token:
            headers["authorization"] = f"Bearer {self.cfg.token}"
        data = json.dumps(self.body(records), ensure_ascii=False, default=str).encode()
        request = urllib.request.Request(self.cfg.url, data=data, headers=headers, method="POST")
        with DIRECT.open(request, timeout=self.cfg.timeout) as answer:  # raises for 4xx and 5xx
            answer.read()

    def close(self) -> None:
        pass


TRANSPORTS: dict[str, type] = {"file": FileSink, "stdout": StdoutSink, "syslog": SyslogSink,
                               "otlp": HttpSink, "webhook": HttpSink}


def transport(cfg: SinkConfig) -> Transport:
    return TRANSPORTS[cfg.type](cfg)
