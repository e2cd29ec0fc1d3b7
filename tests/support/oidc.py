"""A small, standards-compliant OpenID Connect provider for the tests, built on Authlib's
authorization server (Flask integration): discovery, JWKS, the authorization code flow with
PKCE required (RFC 7636) and a login form a real browser fills in, userinfo, and the device
authorization grant (RFC 8628) with ID tokens, which `custody login` uses.

Everything is Authlib's own protocol code; what is ours is the storage (dicts) and knobs a
test turns to make the provider misbehave the ways real ones can: an ID token already
expired (`id_token_ttl`), one carrying another sign-in's nonce (`nonce_override`), groups
only in userinfo (`groups_in_id_token`).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc8628 import DeviceAuthorizationEndpoint, DeviceCodeGrant, DeviceCredentialDict
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode, OpenIDToken
from flask import Flask, Response, jsonify, request
from joserfc.jwk import RSAKey
from werkzeug.serving import WSGIRequestHandler, make_server

LOGIN_FORM = """<!doctype html><html><head><title>Test IdP sign-in</title></head><body>
<h1>Test IdP</h1><form method="post"><label>user <input name="username" id="username"></label>
<label>password <input name="password" id="password" type="password"></label>
<button id="submit" type="submit">Sign in</button></form><p id="error">{error}</p></body></html>"""


@dataclass
class User:
    username: str
    password: str
    email: str
    groups: list[str]
    email_verified: bool = True

    def get_user_id(self) -> str:
        return self.username


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: list[str]
    scope: str = "openid email profile groups"

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope):
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        # a confidential client for the gateway, a public one (PKCE, device grant) for the CLI
        return method in ("client_secret_basic", "client_secret_post", "none")

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type in ("authorization_code", DeviceCodeGrant.GRANT_TYPE)


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: User
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return self.nonce

    def get_auth_time(self):
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None


class Quiet(WSGIRequestHandler):
    def log_request(self, *args) -> None:
        pass


class Provider:
    """The OP on 127.0.0.1 (plain HTTP: only the gateway and the CLI talk to it, locally)."""

    def __init__(self, users: list[User], client_id: str = "custody-approvals", client_secret: str = "op-secret"):
        self.users = {u.username: u for u in users}
        self.client = Client(client_id, client_secret, [])
        self.key = RSAKey.generate_key(2048, parameters={"kid": "op-key-1", "use": "sig", "alg": "RS256"})
        self.codes: dict[str, Code] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.devices: dict[str, dict[str, Any]] = {}
        self.device_grants: dict[str, tuple[User, bool]] = {}
        self.id_token_ttl = 300
        self.nonce_override: str | None = None
        self.groups_in_id_token = True
        self.userinfo_groups: list[str] | None = None
        self.token_requests: list[dict[str, str]] = []
        self.app = self._app()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=Quiet)
        self.port = self.server.server_port
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()

    # the Authlib pieces, bound to this provider's storage

    def _claims(self, user: User, scope: str) -> UserInfo:
        info = UserInfo(sub=user.username, name=user.username)
        if "email" in scope:
            info["email"], info["email_verified"] = user.email, user.email_verified
        if "groups" in scope and self.groups_in_id_token:
            info["groups"] = list(user.groups)
        return info

    def _openid(self, base):
        provider = self

        class Extension(base):
            def resolve_client_private_key(self, client):
                return provider.key

            def get_client_algorithm(self, client):
                return "RS256"

            def get_encode_header(self, client):
                return {"alg": "RS256", "kid": "op-key-1"}

            def get_client_claims(self, client):
                now = int(time.time())
                return {"iss": provider.issuer, "aud": [client.get_client_id()], "iat": now,
                        "exp": now + provider.id_token_ttl}

            def exists_nonce(self, nonce, req):
                return any(c.nonce == nonce for c in provider.codes.values())

            def generate_user_info(self, user, scope):
                return provider._claims(user, scope)

            def get_authorization_code_claims(self, authorization_code):
                claims = super().get_authorization_code_claims(authorization_code)
                if provider.nonce_override is not None:
                    claims["nonce"] = provider.nonce_override
                return claims

        return Extension

    def _app(self) -> Flask:
        provider = self
        app = Flask("test-oidc-provider")

        class CodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

            def save_authorization_code(self, code, req):
                data = req.payload.data
                provider.codes[code] = Code(code, req.client.client_id, req.payload.redirect_uri, req.scope,
                                            req.user, data.get("nonce"), data.get("code_challenge"),
                                            data.get("code_challenge_method"))

            def query_authorization_code(self, code, client):
                found = provider.codes.get(code)
                return found if found is not None and found.client_id == client.client_id else None

            def delete_authorization_code(self, authorization_code):
                provider.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return authorization_code.user

        class DeviceGrant(DeviceCodeGrant):
            def query_device_credential(self, device_code):
                found = provider.devices.get(device_code)
                return DeviceCredentialDict(found) if found else None

            def query_user_grant(self, user_code):
                return provider.device_grants.get(user_code)

            def should_slow_down(self, credential):
                return False

        class DeviceEndpoint(DeviceAuthorizationEndpoint):
            INTERVAL = 1

            def get_verification_uri(self):
                return f"{provider.issuer}/device"

            def save_device_credential(self, client_id, scope, data):
                provider.devices[data["device_code"]] = {**data, "client_id": client_id, "scope": scope,
                                                         "expires_at": int(time.time()) + data["expires_in"]}

        def save_token(token, req):
            provider.tokens[token["access_token"]] = {"user": req.user, "scope": token.get("scope", "")}

        server = AuthorizationServer(app, query_client=lambda cid: self.client if cid == self.client.client_id else None,
                                     save_token=save_token)
        server.register_grant(CodeGrant, [self._openid(OpenIDCode)(require_nonce=True), CodeChallenge(required=True)])
        server.register_grant(DeviceGrant, [self._openid(OpenIDToken)()])
        server.register_endpoint(DeviceEndpoint)

        @app.get("/.well-known/openid-configuration")
        def discovery():
            return jsonify({
                "issuer": provider.issuer, "authorization_endpoint": f"{provider.issuer}/authorize",
                "token_endpoint": f"{provider.issuer}/token", "userinfo_endpoint": f"{provider.issuer}/userinfo",
                "jwks_uri": f"{provider.issuer}/jwks.json",
                "device_authorization_endpoint": f"{provider.issuer}/device_authorization",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"], "code_challenge_methods_supported": ["S256"],
                "grant_types_supported": ["authorization_code", DeviceCodeGrant.GRANT_TYPE],
            })

        @app.get("/jwks.json")
        def jwks():
            return jsonify({"keys": [provider.key.as_dict(private=False)]})

        def signed_in() -> User | None:
            user = provider.users.get(request.form.get("username", ""))
            return user if user is not None and secrets.compare_digest(user.password, request.form.get("password", "")) else None

        @app.route("/authorize", methods=["GET", "POST"])
        def authorize():
            if request.method == "GET":
                server.get_consent_grant(end_user=None)  # validates the request: bad ones never see the form
                return LOGIN_FORM.format(error="")
            user = signed_in()
            if user is None:
                return Response(LOGIN_FORM.format(error="wrong user or password"), 401)
            return server.create_authorization_response(grant_user=user)

        @app.post("/token")
        def token():
            provider.token_requests.append(dict(request.form))
            return server.create_token_response()

        @app.get("/userinfo")
        def userinfo():
            found = provider.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
            if found is None:
                return Response('{"error": "invalid_token"}', 401, content_type="application/json")
            claims = dict(provider._claims(found["user"], found["scope"]))
            if provider.userinfo_groups is not None:
                claims["groups"] = provider.userinfo_groups
            return jsonify(claims)

        @app.post("/device_authorization")
        def device_authorization():
            return server.create_endpoint_response(DeviceEndpoint.ENDPOINT_NAME)

        @app.route("/device", methods=["GET", "POST"])
        def device():
            if request.method == "GET":
                return LOGIN_FORM.format(error="")
            user = signed_in()
            if user is None:
                return Response(LOGIN_FORM.format(error="wrong user or password"), 401)
            provider.device_grants[request.args.get("user_code", "")] = (user, True)
            return "<p id='done'>You may close this window.</p>"

        return app
