"""The approvals page's OpenID Connect relying party: the authorization code flow with
PKCE (S256), state and nonce, through Authlib's OAuth 2.0 client.

The provider is one of the gateway's trusted issuers, so its ID token is verified the way
every token is (addons/engine/tokens.py: its JWKS, issuer, audience = our client id, expiry,
algorithms); here the sign-in's own checks are added: the nonce this sign-in sent, and, for
an ID token with several audiences, `azp`. Groups come from the ID token (the issuer's
`groups_claim`) or from the userinfo endpoint (`groups_from: userinfo`).

Blocking (requests): callers on an event loop run it in a thread. Never through a proxy
from the environment: the gateway talks to its identity provider directly. Authlib and
requests are imported when a sign-in first needs them (the chain starts faster).
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

from addons.engine.config import OidcSignin
from addons.engine.websession import Pending


class OidcError(Exception):
    """The provider could not be used or refused; the message says which step."""


class OidcClient:
    def __init__(self, settings: OidcSignin, redirect_uri: str, timeout: float = 10.0) -> None:
        self.settings, self.redirect_uri, self.timeout = settings, redirect_uri, timeout
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _session(self, **kwargs: Any):
        from authlib.integrations.requests_client import OAuth2Session

        session = OAuth2Session(self.settings.client_id, self.settings.client_secret or None,
                                scope=" ".join(self.settings.scopes), redirect_uri=self.redirect_uri,
                                code_challenge_method="S256",
                                token_endpoint_auth_method="client_secret_basic" if self.settings.client_secret
                                else "none", **kwargs)
        session.trust_env = False
        session.verify = self.settings.issuer.ca_file or True
        return session

    def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (fetched once)."""
        import requests

        with self._lock:
            if self._metadata is None:
                url = self.settings.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
                try:
                    with requests.Session() as http:
                        http.trust_env = False
                        answer = http.get(url, timeout=self.timeout, verify=self.settings.issuer.ca_file or True)
                    answer.raise_for_status()
                    document = answer.json()
                except (requests.RequestException, ValueError, ssl.SSLError) as e:
                    raise OidcError(f"the identity provider's discovery document is unavailable: {e}") from None
                if document.get("issuer") != self.settings.issuer.issuer:
                    raise OidcError(f"the discovery document names issuer {document.get('issuer')!r}")
                self._metadata = document
            return self._metadata

    def authorization_url(self, pending: Pending) -> str:
        url, _ = self._session().create_authorization_url(
            self.metadata()["authorization_endpoint"], state=pending.state, nonce=pending.nonce,
            code_verifier=pending.verifier)
        return url

    def exchange(self, pending: Pending, code: str) -> dict[str, Any]:
        """The token response for `code`, presenting this sign-in's PKCE verifier."""
        import requests
        from authlib.integrations.base_client import OAuthError

        session = self._session(state=pending.state)
        try:
            token = session.fetch_token(self.metadata()["token_endpoint"], code=code, code_verifier=pending.verifier,
                                        timeout=self.timeout)
        except OAuthError as e:
            raise OidcError(f"the identity provider refused the code: {e.error}"
                            + (f" ({e.description})" if e.description else "")) from None
        except requests.RequestException as e:
            raise OidcError(f"the identity provider's token endpoint is unavailable: {e}") from None
        if not token.get("id_token"):
            raise OidcError("the identity provider answered without an ID token (is `openid` in scopes?)")
        return dict(token)

    def userinfo(self, token: dict[str, Any]) -> dict[str, Any]:
        import requests

        endpoint = self.metadata().get("userinfo_endpoint")
        if not endpoint:
            raise OidcError("groups_from is userinfo, but the provider publishes no userinfo_endpoint")
        try:
            answer = self._session(token=token).get(endpoint, timeout=self.timeout)
            answer.raise_for_status()
            return answer.json()
        except (requests.RequestException, ValueError) as e:
            raise OidcError(f"the identity provider's userinfo endpoint failed: {e}") from None


def check_claims(claims: dict[str, Any], pending: Pending, client_id: str) -> None:
    """The checks of OIDC Core 3.1.3.7 that only this sign-in can make (the token's
    signature, issuer, audience and times are verified with the gateway's other tokens)."""
    if claims.get("nonce") != pending.nonce:
        raise OidcError("the ID token's nonce is not this sign-in's (a replayed or injected token)")
    audiences = claims.get("aud")
    if isinstance(audiences, list) and len(audiences) > 1 and claims.get("azp") != client_id:
        raise OidcError("the ID token has several audiences and its azp is not this client")


def groups(source: dict[str, Any], claim: str) -> tuple[str, ...]:
    value = source.get(claim, [])
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise OidcError(f"claim {claim!r} is not a list of group names")
    return tuple(value)


def email(source: dict[str, Any]) -> str:
    """The verified e-mail address of the signed-in person, or ""."""
    value = source.get("email")
    return value.lower() if isinstance(value, str) and "@" in value and source.get("email_verified") is not False else ""
