"""A stand-in for Slack, where the real one cannot be reached: the Web API methods Custody
calls, recorded, and Slack's side of interactivity — signed button clicks sent to the
gateway the way Slack sends them (valid, or with the flaws a test wants).

What it reproduces, and from where:
- The Web API: POST `{base_url}{method}` with `Authorization: Bearer <bot token>` and a
  JSON body, as slack_sdk/web/client.py `WebClient.chat_postMessage`/`chat_update`/
  `chat_postEphemeral` send it (`api_call(..., json=kwargs)`); `users.info` as a GET with
  query parameters (`api_call("users.info", http_verb="GET", params=kwargs)`). Answers are
  HTTP 200 with `{"ok": true, ...}` or `{"ok": false, "error": "..."}` (what the SDK's
  `SlackResponse.validate` turns into SlackApiError): `channel` and `ts` from
  chat.postMessage, `message_not_found` for an update of an unknown ts, `user_not_found`,
  `invalid_auth` for a wrong token — the shapes of Slack's method reference pages.
- A click: `POST` of `payload=<JSON>` (form-encoded) with `X-Slack-Request-Timestamp` and
  `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:{timestamp}:{body}">`, the scheme
  slack_sdk/signature/__init__.py `SignatureVerifier.generate_signature` computes; the
  payload is a `block_actions` document with `user`, `team`, `container` (channel_id,
  message_ts), `state.values` (the message's input blocks) and `actions` (the pressed
  button's action_id and value), as Slack documents block_actions payloads.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import requests

from tests.support.servers import Background


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str


class _Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        owner: SlackStandIn = self.server.owner  # type: ignore[attr-defined]
        url = urllib.parse.urlsplit(self.path)
        method = url.path.rsplit("/", 1)[-1]
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        params: dict[str, Any] = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        if raw:
            kind = self.headers.get("content-type", "")
            params.update(json.loads(raw) if "json" in kind else {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()})
        token = self.headers.get("authorization", "").removeprefix("Bearer ")
        owner.calls.append(Call(method, params, token))
        answer = owner.answer(method, params, token)
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _handle

    def log_message(self, *args) -> None:
        pass


class SlackStandIn(Background):
    def __init__(self, bot_token: str, signing_secret: str, team: str = "T0CUSTODY") -> None:
        self.bot_token, self.signing_secret, self.team = bot_token, signing_secret, team
        self.calls: list[Call] = []
        self.messages: dict[tuple[str, str], list[dict[str, Any]]] = {}  # every version, oldest first
        self.users: dict[str, str] = {}  # Slack user id -> the e-mail Slack has for them
        self._ts = itertools.count(1)
        super().__init__(_Handler)
        self.api_url = f"http://127.0.0.1:{self.port}/api/"

    def answer(self, method: str, params: dict[str, Any], token: str) -> dict[str, Any]:
        if token != self.bot_token:
            return {"ok": False, "error": "invalid_auth"}
        if method == "chat.postMessage":
            ts = f"{int(time.time())}.{next(self._ts):06d}"
            message = {"text": params.get("text", ""), "blocks": params.get("blocks", []), "ts": ts}
            self.messages[(params["channel"], ts)] = [message]
            return {"ok": True, "channel": params["channel"], "ts": ts, "message": message}
        if method == "chat.update":
            versions = self.messages.get((params.get("channel"), params.get("ts")))
            if versions is None:
                return {"ok": False, "error": "message_not_found"}
            message = {"text": params.get("text", ""), "blocks": params.get("blocks", []), "ts": params["ts"]}
            versions.append(message)
            return {"ok": True, "channel": params["channel"], "ts": params["ts"], "text": message["text"],
                    "message": message}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{int(time.time())}.{next(self._ts):06d}"}
        if method == "users.info":
            email = self.users.get(params.get("user", ""))
            if email is None:
                return {"ok": False, "error": "user_not_found"}
            return {"ok": True, "user": {"id": params["user"], "team_id": self.team, "profile": {"email": email}}}
        return {"ok": False, "error": "unknown_method"}

    # what Custody did

    def called(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def posted_for(self, approval_id: str) -> list[tuple[str, str]]:
        """The (channel, ts) of every message about `approval_id`."""
        return [key for key, versions in self.messages.items()
                if any(approval_id in json.dumps(v["blocks"]) for v in versions)]

    def told(self, user: str) -> list[str]:
        """What Custody told `user` privately (chat.postEphemeral), oldest first."""
        return [c.params["text"] for c in self.called("chat.postEphemeral") if c.params.get("user") == user]

    # Slack's side of a click

    def payload(self, channel: str, ts: str, user: str, action: str, reason: str = "", version: int = -1,
                team: str | None = None) -> bytes:
        """The body Slack sends when `user` presses `action` on the message as it was at `version`."""
        message = self.messages[(channel, ts)][version]
        button = next(e for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]
                      if e.get("action_id") == action)
        inputs = [b for b in message["blocks"] if b["type"] == "input"]
        document = {
            "type": "block_actions",
            "user": {"id": user, "team_id": team or self.team},
            "team": {"id": team or self.team},
            "api_app_id": "A0CUSTODY",
            "container": {"type": "message", "message_ts": ts, "channel_id": channel, "is_ephemeral": False},
            "channel": {"id": channel},
            "message": message,
            "state": {"values": {b["block_id"]: {b["element"]["action_id"]: {"type": "plain_text_input", "value": reason or None}}
                                 for b in inputs}},
            "response_url": f"{self.api_url}response/{ts}",
            "trigger_id": f"{next(self._ts)}.trigger",
            "actions": [{"type": "button", "action_id": button["action_id"], "block_id": "custody_vote",
                         "value": button.get("value", ""), "action_ts": str(time.time())}],
        }
        return urllib.parse.urlencode({"payload": json.dumps(document)}).encode()

    def sign(self, body: bytes, timestamp: int, secret: str | None = None) -> dict[str, str]:
        base = f"v0:{timestamp}:".encode() + body
        digest = hmac.new((secret or self.signing_secret).encode(), base, hashlib.sha256).hexdigest()
        return {"x-slack-request-timestamp": str(timestamp), "x-slack-signature": f"v0={digest}",
                "content-type": "application/x-www-form-urlencoded"}

    def send(self, url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(url, data=body, headers=headers, timeout=15)

    def click(self, url: str, channel: str, ts: str, user: str, action: str, reason: str = "", version: int = -1
              ) -> requests.Response:
        body = self.payload(channel, ts, user, action, reason, version)
        return self.send(url, body, self.sign(body, int(time.time())))
