"""mitmweb's own REST API, as its UI uses it: a real mitmweb, driven the way its page is."""

from __future__ import annotations

import requests

from tests.support.approvals import wait_for


class Mitmweb:
    """mitmweb's own REST API, as its UI uses it (token, then the XSRF cookie)."""

    def __init__(self, port: int, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = requests.Session()
        self.session.get(self.base + "/", timeout=10)  # the login page sets the XSRF cookie
        self.session.headers["Authorization"] = f"Bearer {password}"
        self.session.headers["X-XSRFToken"] = self.session.cookies["_mitmproxy_xsrf"]

    def flows(self) -> list[dict]:
        return self.session.get(self.base + "/flows", timeout=10).json()

    def held(self, path: str) -> dict:
        return wait_for(lambda: next((f for f in self.flows() if f["request"]["path"] == path and f["intercepted"]), None))

    def dump(self) -> bytes:
        return self.session.get(self.base + "/flows/dump", timeout=10).content

    def command(self, name: str, *arguments: str):
        """A mitmproxy command, through the endpoint mitmweb's command bar uses."""
        answer = self.post(f"/commands/{name}", {"arguments": list(arguments)}).json()
        assert "error" not in answer, answer
        return answer["value"]

    def post(self, path: str, document: dict | None = None) -> requests.Response:
        r = self.session.post(self.base + path, json=document, timeout=10)
        r.raise_for_status()
        return r

    def put(self, path: str, document: dict) -> None:
        self.session.put(self.base + path, json=document, timeout=10).raise_for_status()
