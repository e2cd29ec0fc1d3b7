"""Helpers for approval tests: review rules, an approver client, agents that get held."""

from __future__ import annotations

import socket
import time

import requests
import yaml

from tests.conftest import STANDARD_RULES, standard_gateway
from tests.support.gateway import Gateway
from tests.support.servers import free_port

REVIEW_RULES = {
    **STANDARD_RULES,
    "review.yaml": {"rules": [
        {"id": "orders-need-two-managers", "match": {"connection": "api", "method": "POST", "path": "/orders"},
         "effect": "review", "reason": "orders need two managers",
         "review": {"approvers": ["group:managers"], "approvals": 2, "denials": 1, "timeout": "30s", "ttl": "1h"}},
        {"id": "quick-review", "match": {"connection": "api", "method": "POST", "path": "/quick"},
         "effect": "review", "reason": "quick check",
         "review": {"approvers": ["group:managers"], "timeout": "1s", "ttl": "1h"}},
        {"id": "short-lived", "match": {"connection": "api", "method": "POST", "path": "/short"},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "1s", "ttl": "2s"}},
        {"id": "one-manager", "match": {"connection": "api", "method": "POST", "path": "/restock"},
         "effect": "review", "reason": "restocking needs a manager",
         "review": {"approvers": ["group:managers"], "timeout": "60s"}},
        {"id": "dual-managers", "match": {"connection": "api", "method": "POST", "path": "/dual"},
         "effect": "review", "review": {"approvers": ["group:managers"], "timeout": "30s"}},
        {"id": "dual-security", "match": {"connection": "api", "method": "POST", "path": "/dual"},
         "effect": "review", "review": {"approvers": ["subject:security-lead"], "timeout": "30s"}},
    ]},
}
# the orders rule's own `orders-reviewed` (1 s) from the standard rules is narrower; drop it
REVIEW_RULES["guards.yaml"] = {"rules": [r for r in STANDARD_RULES["guards.yaml"]["rules"] if r["id"] != "orders-reviewed"]}


class Approver:
    """An approver using the API on the approvals listener, as a browser or the CLI would."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.session = url, requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def list(self, state: str = "pending") -> list[dict]:
        r = self.session.get(f"{self.url}/approvals", params={"state": state} if state else {}, timeout=10)
        r.raise_for_status()
        return r.json()["approvals"]

    def show(self, approval_id: str) -> dict:
        return self.session.get(f"{self.url}/approvals/{approval_id}", timeout=10).json()

    def vote(self, approval_id: str, action: str, reason: str = "", **more) -> requests.Response:
        return self.session.post(f"{self.url}/approvals/{approval_id}/{action}", json={"reason": reason, **more},
                                 timeout=10)


def make_gateway(directory, servers, webhooks=(), approvals: dict | None = None, env: dict | None = None,
                 **overrides) -> Gateway:
    gw = standard_gateway(directory, servers, **{"rules": REVIEW_RULES, **overrides})
    gw.env.update(env or {})
    port = free_port()
    gw.config["approvals"] = {"listen": f"127.0.0.1:{port}", "sweep": "200ms", **(approvals or {})}
    gw.config["notify"] = {"webhooks": list(webhooks), "retries": 2, "backoff": "100ms", "timeout": "2s"}
    gw.config_file.write_text(yaml.safe_dump(gw.config))
    gw.approvals_url = f"http://127.0.0.1:{port}"
    return gw


def start(gw: Gateway) -> Gateway:
    """Start `gw` and wait for its approvals listener too."""
    gw.start()
    wait_for(lambda: listening(gw.approvals_url))
    return gw


def wait_for(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def send(gw: Gateway, token: str, path: str, body: dict, scheme: str = "http", **headers) -> requests.Response:
    return gw.session(token).post(f"{scheme}://api.test{path}", json=body, timeout=60, headers=headers)


def pending_for(approver: Approver, marker: str) -> dict:
    """The pending approval whose request body carries `marker`."""
    return wait_for(lambda: next((a for a in approver.list() if marker in a["request"]["body"]), None))


def listening(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.2).close()
        return True
    except OSError:
        return False
