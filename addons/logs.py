"""logs: the gateway's log lines as JSON objects (`log.format: json`), one per line.

Log shippers (Vector, Fluent Bit, a SIEM's agent) read the gateway's output as JSON lines.
Every line has `ts` (UTC, RFC 3339), `level`, `logger` and `message`; a line about a flow
(an addon that failed, an audit write that failed, masking that could not run) also has
the ids that tie it to the audit record: `flow`, `session`, `decision_event`, `events`
(addons/context.py `log_fields`), and `exception` when there is one. In JSON, the gateway
also writes one `custody.requests` line per finished request (health probes aside, as
they are not recorded either): method, host, path (never the query, which may carry
secrets), status, effect, rules, principal and the event ids.

The format applies from the moment the configuration is loaded; what mitmproxy prints
before that (a configuration that cannot be read) stays text.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from mitmproxy import http
from mitmproxy import log as mlog

from addons import context
from addons.failclosed import guarded
from addons.settings import Settings
from addons.wellknown import PROBE

requests_log = logging.getLogger("custody.requests")
LOGGED = "custody-logged"
"""flow.metadata: the flow's request line is written (an error after the response must not write it twice)."""


def as_json(record: logging.LogRecord, exception: str = "") -> dict[str, Any]:
    """One log record as the object its JSON line holds."""
    out: dict[str, Any] = {
        "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "message": record.getMessage(),
    }
    out.update(getattr(record, context.LOG_FIELDS, None) or {})
    if exception:
        out["exception"] = exception
    return out


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else ""
        return json.dumps(as_json(record, exception), ensure_ascii=False, default=str)


def request_fields(f: http.HTTPFlow) -> dict[str, Any]:
    """What the `custody.requests` line says about a finished flow, beside its ids: the host
    as the agent asked for it (the credentials addon may have rerouted the request)."""
    ctx = context.of(f)
    d = ctx.decision
    _scheme, host, _port = f.metadata.get(context.REQUESTED) or (None, f.request.pretty_host, None)
    return {**context.log_fields(f)[context.LOG_FIELDS],
            "protocol": ctx.protocol, "principal": ctx.principal.subject if ctx.principal else None,
            "method": f.request.method, "host": host, "path": f.request.path.split("?")[0],
            "status": f.response.status_code if f.response else None,
            "error": f.error.msg if f.error else None,
            "effect": d.effect if d else None, "rules": list(d.rules) if d else [],
            "approval": ctx.approval or None}


class Logs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.json = False
        self._text: dict[logging.Handler, logging.Formatter | None] = {}

    def configure(self, updated: set[str]) -> None:
        if not self.settings.changed(updated):
            return
        self.json = self.settings.require().observability.log_format == "json"
        for handler in logging.getLogger().handlers:
            if not isinstance(handler, mlog.MitmLogHandler):
                continue
            if self.json and handler not in self._text:
                self._text[handler] = handler.formatter
                handler.setFormatter(JsonLines())
            elif not self.json and handler in self._text:
                handler.setFormatter(self._text.pop(handler))

    @guarded
    def response(self, f: http.HTTPFlow) -> None:
        self._finished(f)

    @guarded
    def error(self, f: http.HTTPFlow) -> None:
        self._finished(f)

    def _finished(self, f: http.HTTPFlow) -> None:
        if not self.json or f.metadata.get(PROBE) or f.metadata.get(LOGGED):
            return
        f.metadata[LOGGED] = True
        fields = request_fields(f)
        requests_log.info("custody: %s %s%s -> %s %s", fields["method"], fields["host"], fields["path"],
                          fields["status"] or fields["error"], fields["effect"] or "undecided",
                          extra={context.LOG_FIELDS: fields})
