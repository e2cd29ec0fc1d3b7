"""mcpguard: the MCP side of the chain — who owns each session, what each tool is, what a
model is offered, and what comes back.

On the request (before policy):
- a message that is not valid JSON-RPC 2.0 or not valid MCP is refused (`invalid_message`);
- a session id this principal did not open is refused as if it did not exist (404
  `unknown_session`): session ids cannot be borrowed, and after a restart clients start anew;
- a tool call gets its action from the connection's configuration (or, where it trusts
  them, from the annotations of the tool's pinned definition; otherwise `exec`, the
  riskiest), the server's annotations as a claim on record, and whether the tool's
  definition changed since it was pinned;
- the client's answer to a server's request must answer one the gateway passed on;
- `initialize` loses the client capabilities (sampling, elicitation, roots) that no rule
  lets the principal use, so the server does not ask for them.

On the response (before masking, which leaves MCP flows to this addon):
- a new Mcp-Session-Id is bound to the principal whose `initialize` created it;
- `tools/list`: each definition is pinned by SHA-256 when first seen (or checked against its
  configured pin; a change is recorded), and the list is filtered: tools the principal may
  not call are removed, those it may call only with approval say so;
- a server's request to the client (on an event stream) is decided like any message; a
  refused one never reaches the agent, and the server is answered with a JSON-RPC error;
- every message is masked with the decision's masks (JSON bodies in the masking workers,
  event streams event by event here), and the connection's own secrets are removed from
  all of it. What cannot be masked is refused; a stream that fails part-way ends with a
  JSON-RPC error for the request it was answering.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from mitmproxy import http

from addons import classifiers, context, failclosed
from addons.auditlog import AuditLog
from addons.credentials import Credentials
from addons.engine import mcp, mcpstate, mcpupstream
from addons.engine.bridge import IDLE, SWEEP
from addons.engine.config import Connection
from addons.engine.errors import Error
from addons.engine.masks import MaskError, Report
from addons.engine.mcpstate import Bounded, Pins, Sessions, Sighting, owner
from addons.engine.model import (
    ANY_PAYLOAD,
    Decision,
    Operation,
    Principal,
    Request,
    new_id,
)
from addons.engine.sse import Event as SseEvent
from addons.engine.sse import EventStream, StreamError
from addons.engine.store import Event, Pin
from addons.failclosed import guarded
from addons.hold import KEEPALIVE, RESUME
from addons.maskpool import MaskPool, MaskUnavailable
from addons.policy import Policy
from addons.settings import Settings

logger = logging.getLogger(__name__)

UNKNOWN_SESSION = ("no such MCP session for you on this connection: it ended, the gateway restarted, or another "
                   "principal opened it; initialize a new session")
REVIEW_NOTE = "[Custody: calls to this tool wait for a person's approval.]"
NO_REVIEW = "a server's request to the client cannot wait for approval: refused"


def merged(*reports: dict[str, Any]) -> dict[str, Any]:
    """Masking reports (counts, never values) added up."""
    out: dict[str, Any] = {"masked": 0, "fields": {}, "entities": {}}
    for r in reports:
        out["masked"] += r.get("masked", 0)
        for key in ("fields", "entities"):
            for name, n in (r.get(key) or {}).items():
                out[key][name] = out[key].get(name, 0) + n
    return out


class McpGuard:
    def __init__(self, settings: Settings, log: AuditLog, pool: MaskPool, policy: Policy,
                 credentials: Credentials) -> None:
        self.settings, self.log, self.pool, self.policy, self.credentials = settings, log, pool, policy, credentials
        self.sessions = Sessions()
        self.pins = Pins()
        self.passed: Bounded = Bounded(100_000)
        """(connection, session, owner, request id) of a server request passed on -> its method."""
        self.deliveries: Bounded = Bounded(10_000)
        """(connection, session, id of the gateway's ping) -> refusals to give the older transport's stream."""
        self.resumable: Bounded = Bounded(10_000)
        """Approval id of a held call whose client will come back -> (owner, connection, path, body)."""
        self._sweeper: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def configure(self, updated: set[str]) -> None:
        if self.settings.changed(updated):
            self.pins.configure(self.settings.require().connections, self.log.reader.pins())

    def running(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            self.sessions.sweep(IDLE)

    # the request

    @guarded
    def request(self, f: http.HTTPFlow) -> None:
        if failclosed.answered(f):
            return
        c = context.of(f)
        if c.protocol != "mcp" or c.operation is None or c.principal is None:
            return
        conn = self.settings.registry.by_name[c.connection]
        if self._invalid(f, c.operation):
            return
        sid = c.operation.details.get("session", "")
        session = self.sessions.get(conn.name, sid) if sid else None
        if sid and (session is None or session.owner != owner(c.principal)):
            failclosed.refuse(f, 404, UNKNOWN_SESSION, error=Error.UNKNOWN_SESSION)
            return
        resume = f.request.headers.get("last-event-id", "")
        if c.operation.details.get("method") == mcp.LISTEN and resume.startswith(mcp.RESUME_PREFIX):
            if not self._resumed(f, c, conn, resume.removeprefix(mcp.RESUME_PREFIX)):
                return
        c.operation = self.plan(conn, c.principal, c.operation, sid)
        if self._invalid(f, c.operation):
            return
        if (conn.mcp.keepalive and c.operation.details.get("http") == "POST"
                and "text/event-stream" in f.request.headers.get("accept", "")):
            f.metadata[KEEPALIVE] = conn.mcp.keepalive
        if c.operation.details.get("method") == "initialize":
            self._limit_capabilities(f, c, conn)
        if session is not None:
            for p in c.operation.parts or (c.operation,):
                if p.details.get("kind") == "request":
                    session.asked[mcp.id_key(p.details["id"])] = c

    def _resumed(self, f: http.HTTPFlow, c: context.Context, conn: Connection, approval: str) -> bool:
        """A client coming back (Last-Event-ID) for the answer to a held call: the request
        becomes that call again, as it was, and waits on its approval; the answer is an
        event stream, as the client expects."""
        f.metadata[mcp.AS_STREAM] = True
        held = self.resumable.get(approval)
        if held is None or held[:2] != (owner(c.principal), conn.name):
            failclosed.refuse(f, 404, f"no held call {approval} of yours to resume (it was answered, or the gateway "
                                      "restarted); send the call again", error=Error.NOT_FOUND)
            return False
        f.request.method, f.request.path, f.request.content = "POST", held[2], held[3]
        f.request.headers["content-type"] = "application/json"
        f.request.headers["accept"] = "application/json, text/event-stream"
        f.request.headers.pop("last-event-id", None)
        c.operation = classifiers.classify("mcp", conn.name, Request(
            "POST", held[2], tuple(f.request.headers.items(multi=True)), held[3]))
        f.metadata[RESUME] = approval
        return not self._invalid(f, c.operation)

    def _remember(self, f: http.HTTPFlow, c: context.Context) -> None:
        """A held call whose client was told to come back for its answer."""
        if c.decision.error == Error.APPROVAL_PENDING and c.approval and f.response is not None \
                and f.response.headers.get("content-type", "").startswith("text/event-stream"):
            self.resumable[c.approval] = (owner(c.principal), c.connection, f.request.path,
                                          f.request.get_content(strict=False) or b"")

    @staticmethod
    def _invalid(f: http.HTTPFlow, op: Operation) -> bool:
        if "invalid" not in op.details:
            return False
        failclosed.refuse(f, 400, op.details["invalid"], error=Error.INVALID_MESSAGE)
        return True

    def plan(self, conn: Connection, principal: Principal, op: Operation, sid: str) -> Operation:
        """The operation as this connection's configuration and what the gateway has seen say."""
        if op.parts:
            parts = tuple(self.plan(conn, principal, p, sid) for p in op.parts)
            details = dict(op.details)
            if (bad := next((n for n, p in enumerate(parts) if "invalid" in p.details), None)) is not None:
                details.update(invalid=f"message {bad + 1} of the batch is invalid", jsonrpc_code=mcp.INVALID_REQUEST)
            strongest = max(parts, key=lambda p: p.risk)
            return dataclasses.replace(op, action=strongest.action, risk=strongest.risk, details=details, parts=parts)
        if op.details.get("kind") == "response":
            method = self.passed.pop((conn.name, sid, owner(principal), mcp.id_key(op.details["id"])), None)
            if method is None:
                return dataclasses.replace(op, details={
                    **op.details, "invalid": "this answers no request of the server's that the gateway passed on",
                    "jsonrpc_code": mcp.INVALID_REQUEST})
            action = mcp.SERVER_METHODS.get(method, mcp.UNKNOWN)
            return dataclasses.replace(op, action=action, resource=method, risk=mcp.RISK[action],
                                       summary=f"the client's answer to the server's {method} on {conn.name}",
                                       details={**op.details, "method": method, "initiator": "server"})
        if op.details.get("method") == "tools/call":
            return self.tool_call(conn, op)
        return op

    def tool_call(self, conn: Connection, op: Operation) -> Operation:
        return mcpstate.tool_call(conn, op, self.pins.get(conn.name, op.details["tool"]))

    @staticmethod
    def server_operation(conn: Connection, method: str, rid: Any, params: Any) -> Operation:
        action = mcp.SERVER_METHODS.get(method, mcp.UNKNOWN)
        return Operation("mcp", conn.name, action, method, mcp.RISK[action], f"the server's {method} on {conn.name}",
                         {"method": method, "kind": "request", "id": rid, "initiator": "server"}, payload=params)

    def _limit_capabilities(self, f: http.HTTPFlow, c: context.Context, conn: Connection) -> None:
        """Take out of `initialize` the client capabilities no rule lets this principal use."""
        params = c.operation.payload if isinstance(c.operation.payload, dict) else {}
        caps = params.get("capabilities")
        if not isinstance(caps, dict):
            return
        removed = [name for method, name in mcp.CLIENT_CAPABILITIES.items() if name in caps and self.policy.rules.decide(
            c.principal, self.server_operation(conn, method, None, ANY_PAYLOAD)).effect != "allow"]
        if not removed:
            return
        doc = json.loads(f.request.get_content())
        doc["params"]["capabilities"] = {k: v for k, v in caps.items() if k not in removed}
        f.request.content = json.dumps(doc, ensure_ascii=False).encode()
        c.operation = dataclasses.replace(c.operation, payload=doc["params"],
                                          details={**c.operation.details, "capabilities_removed": removed})

    # the response

    @guarded
    def responseheaders(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol != "mcp" or c.operation is None or not c.cleared:
            return
        conn = self.settings.registry.by_name[c.connection]
        resp = f.response
        sid = resp.headers.get("mcp-session-id", "")
        if c.operation.details.get("method") == "initialize" and 200 <= resp.status_code < 300 and sid:
            if not (mcp.SESSION_ID.match(sid) and self.sessions.bind(conn.name, sid, c.principal)):
                failclosed.refuse_at_headers(f, 502, "the MCP server's session id is malformed or another principal's; "
                                         "the answer was not sent", error=Error.GATEWAY_ERROR)
                return
        if not resp.headers.get("content-type", "").lower().startswith("text/event-stream"):
            resp.stream = False  # filtered and masked whole, in the response hook
            return
        try:
            self.pool.masker(c.decision.masks)
        except MaskError:
            failclosed.refuse_at_headers(f, 502, "masking is not ready; the stream was not sent", error=Error.MASKING_UNAVAILABLE)
            return
        c.stream = resp.stream = McpStream(self, f, c, conn)
        c.masked = True

    @guarded
    async def response(self, f: http.HTTPFlow) -> None:
        c = context.of(f)
        if c.protocol != "mcp" or c.operation is None or c.decision is None:
            return
        if c.decision.effect != "allow":
            self._remember(f, c)  # a refusal is the gateway's own JSON-RPC error
            self._deliver(f, c)
            return
        if isinstance(c.stream, McpStream):
            c.response_body = bytes(c.stream.sent)
            c.masking = c.masking or c.stream.report.as_dict()
            return
        if c.response_body is not None:
            return  # refused as its headers arrived
        conn = self.settings.registry.by_name[c.connection]
        if c.operation.details.get("method") == mcp.CLOSE and 200 <= f.response.status_code < 300:
            self.sessions.end(conn.name, c.operation.details["session"])
        content = f.response.get_content(strict=False) or b""
        c.masked = True
        if f.response.status_code == 202 and content:
            f.response.content = b""  # an acknowledgement carries nothing (the older transport says "Accepted")
            return
        if not content:
            return
        if "json" not in f.response.headers.get("content-type", "").lower():
            await self._text(f, c, conn, content)
            return
        try:
            doc = json.loads(content)
        except ValueError:
            failclosed.refuse(f, 502, "the MCP server's answer is not valid JSON; it was not sent",
                              error=Error.MASKING_REFUSED)
            return
        notes: list[tuple[Event, Pin | None]] = []
        messages = doc if isinstance(doc, list) else [doc]
        sid = c.operation.details.get("session", "")
        answered = [self.from_server(f, c, conn, m, notes, sid)[0] for m in messages]
        kept = [m for m in answered if m is not None]
        if notes and not await self._recorded(f, notes):
            return
        body = content
        if any(a is not b for a, b in zip(answered, messages)):
            body = json.dumps(kept if isinstance(doc, list) else (kept or [None])[0], ensure_ascii=False,
                              separators=(",", ":")).encode()
        reports = []
        if c.decision.masks:
            try:
                body, report = await self.pool.mask(body, mcp.MCP_MESSAGES, c.decision.masks)
            except MaskError as e:
                failclosed.refuse(f, 502, f"{e}; it was not sent", error=Error.MASKING_REFUSED)
                return
            except MaskUnavailable as e:
                failclosed.refuse(f, 502, f"{e}; the answer was not sent", error=Error.MASKING_UNAVAILABLE)
                return
            reports.append(report)
        if conn.secrets:
            scrubbed = Report()
            clean = mcp.scrub(json.loads(body), conn.secrets, scrubbed)
            if scrubbed.masked:
                body = json.dumps(clean, ensure_ascii=False, separators=(",", ":")).encode()
                reports.append(scrubbed.as_dict())
        if f.metadata.get(mcp.AS_STREAM):  # a client that came back reads an event stream
            answers = json.loads(body)
            body = b"".join(mcp.sse_message(m) for m in (answers if isinstance(answers, list) else [answers]))
            f.response.headers["content-type"] = "text/event-stream"
        f.response.content = body
        if reports:
            c.masking = merged(*reports)

    async def _text(self, f: http.HTTPFlow, c: context.Context, conn: Connection, content: bytes) -> None:
        """An answer that is not JSON (a server's plain-text error): masks need messages."""
        if c.decision.masks:
            failclosed.refuse(f, 502, f"the MCP server answered {f.response.headers.get('content-type') or 'without a type'}"
                                      ", which cannot be masked; it was not sent", error=Error.MASKING_REFUSED)
            return
        report = Report()
        text = mcp.scrub(content.decode("utf-8", "replace"), conn.secrets, report)
        if report.masked:
            f.response.content = text.encode()
            c.masking = report.as_dict()

    def from_server(self, f: http.HTTPFlow, c: context.Context, conn: Connection, msg: Any,
                    notes: list[tuple[Event, Pin | None]], sid: str) -> tuple[Any, tuple]:
        """One message from the server of session `sid` as the agent may have it (None when
        it may not), and the masks it gets: an answer, those of the request it answers."""
        if not isinstance(msg, dict):
            return msg, c.decision.masks
        if "method" in msg and "id" in msg:
            return self._server_request(f, c, conn, msg, notes, sid), c.decision.masks
        if "method" in msg:
            return msg, c.decision.masks  # a notification (progress, logging, list changed)
        asking, asked = self._asked(c, conn, msg.get("id"), sid)
        if asking is None:
            return None, ()  # on an event stream, an answer to nothing the gateway passed on: withheld
        if asking.decision is None or asking.decision.effect != "allow":
            reason = asking.decision.reason if asking.decision is not None else "the request was not decided"
            return mcp.answer(msg.get("id"), mcp.error_object(mcp.INTERNAL_ERROR, f"custody: {reason}; the answer "
                                                                                  "was withheld")), ()
        masks = asking.decision.masks
        if asked is not None and asked.details.get("method") == "tools/list" and isinstance(msg.get("result"), dict):
            return {**msg, "result": self.offer(f, c, conn, asked, msg["result"], notes)}, masks
        return msg, masks

    def _asked(self, c: context.Context, conn: Connection, rid: Any,
               sid: str) -> tuple[context.Context | None, Operation | None]:
        """The flow and message of the client's that a response answers: one of this flow's,
        or, on an event stream, one the session's client sent on another request."""
        key = mcp.id_key(rid)
        session = self.sessions.get(conn.name, sid) if sid else None
        waiting = session.asked.pop(key, None) if session is not None else None
        asking = waiting if c.operation.details.get("method") == mcp.LISTEN else c
        if asking is None or asking.operation is None:
            return None, None
        return asking, next((p for p in asking.operation.parts or (asking.operation,)
                             if p.details.get("kind") == "request" and mcp.id_key(p.details.get("id")) == key), None)

    def offer(self, f: http.HTTPFlow, c: context.Context, conn: Connection, asked: Operation, result: dict,
              notes: list[tuple[Event, Pin | None]]) -> dict:
        """`tools/list`: pin or check each definition, and offer only what the principal may call."""
        tools = result.get("tools")
        if not isinstance(tools, list):
            return result
        kept, removed, review = [], {}, []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if not isinstance(name, str) or not mcp.TOOL_NAME.match(name):
                removed[json.dumps(name)[:130]] = "not a valid tool name (1-128 letters, digits, '_', '-', '.')"
                continue
            sighting = self.pins.see(conn, tool)
            if sighting.news:
                notes.append(self._sighting(f, c, conn, tool, sighting))
            call = self.tool_call(conn, Operation("mcp", conn.name, mcp.EXEC, name, mcp.UNCONFIGURED_TOOL_RISK,
                                                  f"tools/call {name} on {conn.name}",
                                                  {"method": "tools/call", "kind": "request", "id": None, "tool": name},
                                                  payload=ANY_PAYLOAD))
            decision = self.policy.rules.decide(c.principal, call)
            if decision.effect == "deny":
                removed[name] = decision.reason
                continue
            if decision.effect == "review":
                review.append(name)
                tool = {**tool, "description": f"{REVIEW_NOTE} {tool.get('description') or ''}".rstrip()}
            kept.append(tool)
        notes.append((self._event(f, c, "tools", asked, detail={
            "listed": len(tools), "offered": [t["name"] for t in kept], "removed": removed, "review": review}), None))
        return {**result, "tools": kept}

    def _sighting(self, f: http.HTTPFlow, c: context.Context, conn: Connection, tool: dict,
                  sighting: Sighting) -> tuple[Event, Pin | None]:
        name, fp = tool["name"], mcp.tool_fingerprint(tool)
        if sighting.outcome == "pinned":
            return (self._event(f, c, "tool_pinned", None, detail={"tool": name, "fingerprint": fp, "definition": tool}),
                    Pin(conn.name, name, fp, tool))
        if sighting.outcome == "changed":
            return (self._event(f, c, "tool_changed", None, detail={
                "tool": name, "pinned": sighting.pin.fingerprint, "source": sighting.pin.source, "listed": fp,
                "definition": tool}), None)
        return self._event(f, c, "tool_refused", None, detail={
            "tool": name, "listed": fp, "reason": "not pinned, and new tools are refused (mcp.new_tools)"}), None

    def _server_request(self, f: http.HTTPFlow, c: context.Context, conn: Connection, msg: dict,
                        notes: list[tuple[Event, Pin | None]], sid: str) -> dict | None:
        """A server's request to the client: passed on when a rule allows it; otherwise
        dropped, and the server answered with a JSON-RPC error on the client's behalf."""
        method, rid = msg.get("method"), mcp.request_id(msg)
        op = self.server_operation(conn, method if isinstance(method, str) else "", rid, msg.get("params"))
        decision = self.policy.rules.decide(c.principal, op)
        if decision.effect == "review":
            decision = Decision("deny", decision.rules, NO_REVIEW, status=403, error=Error.DENIED_BY_POLICY)
        if decision.effect == "allow" and rid is not None:
            self.passed[(conn.name, sid, owner(c.principal), mcp.id_key(rid))] = op.resource
            notes.append((self._event(f, c, "decision", op, decision), None))
            return msg
        told = rid is not None
        notes.append((self._event(f, c, "decision", op, decision, {"answered_server": told}), None))
        if told:
            error = mcp.error_object(mcp.REFUSED, f"custody: {decision.reason}",
                                     {"decision": "deny", "error": decision.error, "rules": list(decision.rules)})
            session = self.sessions.get(conn.name, sid) if sid else None
            if session is not None and session.endpoint:
                self._later(self._tell(conn, session.endpoint, {}, mcp.answer(rid, error)))
            else:
                headers = {k: v for k, v in (("mcp-session-id", sid), ("mcp-protocol-version",
                                             f.request.headers.get("mcp-protocol-version", ""))) if v}
                self._later(self._tell(conn, f.request.path, headers, mcp.answer(rid, error)))
        return None

    async def _tell(self, conn: Connection, target: str, headers: dict[str, str], message: dict) -> None:
        """Send the server a message of the gateway's own (on the client's behalf)."""
        if (credential := await self.credentials.header(conn)) is not None:
            headers = {**headers, credential[0]: credential[1]}
        status = await asyncio.to_thread(mcpupstream.post, conn, target, headers, message)
        if not 200 <= status < 300:
            logger.error("custody: %s answered %d to a message of the gateway's", conn.name, status)

    def _deliver(self, f: http.HTTPFlow, c: context.Context) -> None:
        """The older HTTP+SSE transport reads answers only from its event stream, never from
        the POST: a refusal is carried there. The gateway pings the server on the session
        and puts the refusal in place of the server's answer to that ping."""
        op = c.operation
        sid = op.details.get("session", "")
        session = self.sessions.get(c.connection, sid) if sid else None
        if (session is None or not session.endpoint or c.principal is None or session.owner != owner(c.principal)
                or op.details.get("http") != "POST"):
            return
        conn = self.settings.registry.by_name[c.connection]
        try:
            response = json.loads(f.response.get_content(strict=False) or b"")
        except ValueError:
            return
        errors = [m for m in (response if isinstance(response, list) else [response])
                  if isinstance(m, dict) and m.get("id") is not None]
        if not errors:
            return
        ping = f"custody-{new_id()}"
        self.deliveries[(conn.name, sid, mcp.id_key(ping))] = errors
        self._later(self._tell(conn, session.endpoint, {}, {"jsonrpc": mcp.JSONRPC, "id": ping, "method": "ping"}))

    def delivered(self, conn: Connection, sid: str, messages: list) -> list[tuple[Any, bool]]:
        """The messages of an event stream, with the answers to the gateway's pings replaced
        by the refusals they were sent for; each says whether it is the gateway's own."""
        out: list[tuple[Any, bool]] = []
        for m in messages:
            waiting = self.deliveries.pop((conn.name, sid, mcp.id_key(m.get("id"))), None) \
                if isinstance(m, dict) and "method" not in m else None
            out += [(r, True) for r in waiting] if waiting is not None else [(m, False)]
        return out

    def _event(self, f: http.HTTPFlow, c: context.Context, kind: str, op: Operation | None,
               decision: Decision | None = None, detail: dict | None = None) -> Event:
        return Event(id=new_id(), kind=kind, session=c.session, flow=f.id, principal=c.principal, operation=op,
                     connection=c.connection, decision=decision, approval=c.approval, detail=detail or {})

    async def _write(self, notes: list[tuple[Event, Pin | None]]) -> None:
        await self.log.write([e for e, _ in notes], [p for _, p in notes if p is not None])

    async def _recorded(self, f: http.HTTPFlow, notes: list[tuple[Event, Pin | None]]) -> bool:
        try:
            await self._write(notes)
        except Exception as e:
            logger.error("custody: audit store write failed; withholding the MCP answer", exc_info=e)
            failclosed.refuse(f, 502, f"audit store unavailable ({type(e).__name__}); the answer was withheld",
                              error=Error.AUDIT_UNAVAILABLE)
            return False
        return True

    def record_later(self, notes: list[tuple[Event, Pin | None]]) -> None:
        """For an event stream (its hook cannot wait): recorded as soon as the store can."""
        self._later(self._write(notes))

    def _later(self, job) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("custody: an MCP side task failed", exc_info=task.exception())


class McpStream:
    """The stream hook of an MCP event stream: each event's message decided where it is the
    server's request, filtered where it answers `tools/list`, masked, and sent; anything
    that goes wrong ends the stream with a JSON-RPC error for the requests it was answering
    (so the client's call ends instead of hanging), and nothing after it is sent."""

    def __init__(self, guard: McpGuard, f: http.HTTPFlow, c: context.Context, conn: Connection) -> None:
        cfg = guard.settings.require()
        self.guard, self.flow, self.ctx, self.conn = guard, f, c, conn
        self.report = Report()
        self.events = EventStream(self.event, cfg.masking.max_record, keep=cfg.store.max_body)
        self.answered: set[str] = set()
        self.failed = ""
        self.sid = c.operation.details.get("session", "")

    @property
    def size(self) -> int:
        return self.events.size

    @property
    def sent(self) -> bytearray:
        return self.events.sent

    def __call__(self, chunk: bytes) -> list[bytes]:
        """The chunks to send for one from the server: none rather than an empty one, which
        mitmproxy would send as the last chunk of a chunked body, ending the stream."""
        if self.failed:
            return []
        try:
            out = self.events(chunk)
        except Exception as e:
            self.failed = str(e) if isinstance(e, (MaskError, StreamError)) else f"{type(e).__name__}: {e}"
            logger.error("custody: an MCP event stream failed; cutting it off: %s", self.failed)
            self.ctx.masking = {"error": self.failed, **self.report.as_dict()}
            out = self.events.account(self.cut_off())
        return [out] if out else []

    def event(self, ev: SseEvent) -> bytes:
        if ev.type == "endpoint":
            return self.endpoint(ev)
        if ev.type != "message" or not ev.data:
            return ev.encode()  # comments, keep-alives, priming events
        try:
            doc = json.loads(ev.data)
        except ValueError:
            raise StreamError("an event of the stream is not a JSON-RPC message") from None
        notes: list[tuple[Event, Pin | None]] = []
        messages = doc if isinstance(doc, list) else [doc]
        answered = [(m, ()) if ours else self.guard.from_server(self.flow, self.ctx, self.conn, m, notes, self.sid)
                    for m, ours in self.guard.delivered(self.conn, self.sid, messages)]
        if notes:
            self.guard.record_later(notes)
        out = [mcp.mask_message(self.guard.pool.masker(masks), m, self.report) if masks else m
               for m, masks in answered if m is not None]
        if not out:
            return b""
        out = mcp.scrub(out, self.conn.secrets, self.report)
        self.answered |= {mcp.id_key(m.get("id")) for m in out if isinstance(m, dict) and "method" not in m}
        data = json.dumps(out if isinstance(doc, list) else out[0], ensure_ascii=False, separators=(",", ":"))
        return ev.with_data(data).encode()

    def endpoint(self, ev: SseEvent) -> bytes:
        """The older HTTP+SSE transport names its message endpoint, with the session in its
        query: the session is bound to this stream's principal, and the endpoint is given
        as a path, so the client posts to it through the gateway."""
        parts = urlsplit(ev.data or "")
        query = dict(parse_qsl(parts.query))
        sid = query.get("session_id") or query.get("sessionId") or ""
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        if not mcp.SESSION_ID.match(sid) or self.guard.sessions.bind(self.conn.name, sid, self.ctx.principal,
                                                                      endpoint=target) is None:
            raise StreamError("the server named a session id that is malformed or another principal's")
        self.sid = sid
        return ev.with_data(target).encode()

    def cut_off(self) -> bytes:
        """A JSON-RPC error for each request of this flow not answered yet."""
        op = self.ctx.operation
        waiting = [p.details["id"] for p in op.parts or (op,) if p.details.get("kind") == "request"
                   and mcp.id_key(p.details["id"]) not in self.answered]
        data = {"decision": "deny", "error": Error.MASKING_REFUSED, "reason": self.failed}
        return b"".join(SseEvent([("event", "message"), ("data", json.dumps(mcp.answer(rid, mcp.error_object(
            mcp.INTERNAL_ERROR, f"custody: {self.failed}; the rest of the answer was withheld", data))))]).encode()
            for rid in waiting)
