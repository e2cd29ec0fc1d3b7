"""OAuth 2.0 grants a client of Custody uses: client credentials (RFC 6749 §4.4), a token
for a client that acts as itself, fetched from the token endpoint (or the one the issuer's
discovery document names) and reused until a minute before it expires; and the device
authorization grant (RFC 8628), by which a person at a terminal signs in with the IdP in a
browser anywhere and the terminal gets their ID token.

The agent host's helper gets its agent's token with client credentials (addons/client); the
gateway gets the token it presents to an MCP server whose credential is `type: oauth`
(addons/credentials.py); `custody login` gets an approver's ID token with the device grant.
Blocking (urllib): callers on an event loop run it in a thread.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class GrantError(Exception):
    """A token could not be had; the message says what to fix."""


class ClientCredentials:
    """OAuth 2.0 client-credentials grant (RFC 6749 §4.4), refreshed before expiry."""

    def __init__(self, client_id: str, client_secret: str, *, token_url: str = "", issuer: str = "",
                 audience: str = "", scope: str = "", leeway: float = 60.0, direct: bool = False) -> None:
        if not (token_url or issuer):
            raise GrantError("client credentials need the issuer or its token URL")
        self.client_id, self.client_secret = client_id, client_secret
        self.token_url, self.issuer, self.audience, self.scope, self.leeway = token_url, issuer, audience, scope, leeway
        self._token, self._expires = "", 0.0
        self._lock = threading.Lock()
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open if direct else urllib.request.urlopen

    def _endpoint(self) -> str:
        if not self.token_url:
            document = _open_json(self._open, self.issuer.rstrip("/") + "/.well-known/openid-configuration")
            self.token_url = document.get("token_endpoint") or ""
            if not self.token_url:
                raise GrantError(f"{self.issuer} publishes no token_endpoint")
        return self.token_url

    def token(self) -> str:
        with self._lock:
            if self._token and self._expires - time.time() > self.leeway:
                return self._token
            form = {"grant_type": "client_credentials", **({"audience": self.audience} if self.audience else {}),
                    **({"scope": self.scope} if self.scope else {})}
            basic = base64.b64encode(f"{urllib.parse.quote(self.client_id)}:{urllib.parse.quote(self.client_secret)}"
                                     .encode()).decode()
            request = urllib.request.Request(self._endpoint(), data=urllib.parse.urlencode(form).encode(), method="POST",
                                             headers={"authorization": f"Basic {basic}",
                                                      "content-type": "application/x-www-form-urlencoded"})
            answer = _open_json(self._open, request)
            token = answer.get("access_token")
            if not token:
                raise GrantError(f"the token endpoint answered without an access_token: {answer}")
            self._token = token
            self._expires = time.time() + float(answer.get("expires_in") or token_expiry(token) - time.time())
            return token


def token_expiry(token: str) -> float:
    """A JWT's exp, read without verifying (the gateway verifies it); now + 5 min if absent."""
    try:
        payload = token.split(".")[1]
        return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (IndexError, KeyError, ValueError, TypeError):
        return time.time() + 300


def _open_json(open_url, request: urllib.request.Request | str) -> dict[str, Any]:
    try:
        with open_url(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise GrantError(f"{e.url}: {e.code} {e.read()[:300].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise GrantError(f"{getattr(request, 'full_url', request)}: {e}") from None


DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def device_login(issuer: str, client_id: str, scope: str, show, *, direct: bool = True,
                 sleep=time.sleep, deadline: float | None = None) -> dict[str, Any]:
    """The device authorization grant (RFC 8628) against `issuer`: `show(authorization)`
    is called once with the device authorization response (verification URI and user
    code, for the person), then the token endpoint is polled until they have signed in.
    Returns the token response (with `id_token` when `openid` is in `scope`)."""
    open_url = urllib.request.build_opener(urllib.request.ProxyHandler({})).open if direct else urllib.request.urlopen
    document = _open_json(open_url, issuer.rstrip("/") + "/.well-known/openid-configuration")
    endpoint = document.get("device_authorization_endpoint")
    if not endpoint:
        raise GrantError(f"{issuer} publishes no device_authorization_endpoint (the device grant is not enabled)")

    def post(url: str, form: dict[str, str]) -> dict[str, Any]:
        request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST",
                                         headers={"content-type": "application/x-www-form-urlencoded",
                                                  "accept": "application/json"})
        try:
            with open_url(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                return json.loads(e.read())
            except ValueError:
                raise GrantError(f"{url}: {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise GrantError(f"{url}: {e}") from None

    authorization = post(endpoint, {"client_id": client_id, "scope": scope})
    if "device_code" not in authorization:
        raise GrantError(f"the device authorization was refused: {authorization.get('error', authorization)}")
    show(authorization)
    interval = float(authorization.get("interval", 5))
    ends = time.monotonic() + float(authorization.get("expires_in", 600)) if deadline is None else deadline
    while time.monotonic() < ends:
        sleep(interval)
        answer = post(document["token_endpoint"], {"grant_type": DEVICE_GRANT, "device_code": authorization["device_code"],
                                                   "client_id": client_id})
        error = answer.get("error")
        if error is None and answer.get("access_token"):
            return answer
        if error == "slow_down":
            interval += 5
        elif error != "authorization_pending":
            raise GrantError(f"the sign-in did not complete: {error}" + (
                f" ({answer['error_description']})" if answer.get("error_description") else ""))
    raise GrantError("the sign-in did not complete before the device code expired")
