"""A SAML 2.0 identity provider for the tests, built on pysaml2's IdP (`saml2.server.Server`):
metadata, single sign-on with the HTTP-Redirect binding and a login form a real browser
fills in, and responses sent back with the HTTP-POST binding, assertions signed (xmlsec1).

`answer()` builds the response a test wants, including the bad ones a real IdP or an
attacker can send: unsigned, altered after signing, for another audience or recipient,
already expired, answering no request.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
import saml2.assertion
from flask import Flask, Response, request
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
from saml2.config import IdPConfig
from saml2.metadata import create_metadata_string
from saml2.saml import NAMEID_FORMAT_PERSISTENT, NAMEID_FORMAT_UNSPECIFIED, NameID
from saml2.server import Server
from saml2.time_util import TIME_FORMAT
from werkzeug.serving import make_server

from tests.support.oidc import LOGIN_FORM, Quiet, User


OTHER_SP = "urn:test:another-service-provider"


@contextlib.contextmanager
def issued_at(offset: int):
    """pysaml2's IdP stamps IssueInstant and NotBefore with `instant()`: shift that clock."""
    real = saml2.assertion.instant
    saml2.assertion.instant = lambda format=TIME_FORMAT, time_stamp=0: real(format, time_stamp or int(time.time()) + offset)
    try:
        yield
    finally:
        saml2.assertion.instant = real


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_file, cert_file = directory / f"{name}.key", directory / f"{name}.crt"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


class IdentityProvider:
    def __init__(self, directory: Path, users: list[User]) -> None:
        self.dir = directory
        self.users = {u.username: u for u in users}
        self.key_file, self.cert_file = self_signed(directory, "saml-idp")
        self.app = self._app()
        self.http = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=Quiet)
        self.port = self.http.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.entity_id = f"{self.url}/metadata"
        self.server = self._server(minutes=5)
        self.sp_metadata = ""
        self.metadata_file = directory / "idp-metadata.xml"
        document = create_metadata_string(None, self.server.config, sign=False)
        self.metadata_file.write_bytes(document if isinstance(document, bytes) else document.encode())
        self.requests: list[dict] = []
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()

    def trust(self, sp_metadata: bytes) -> None:
        """Know a service provider by its metadata (as fetched from it), as IdPs are set up."""
        self.sp_metadata = sp_metadata.decode()
        self.server.metadata.load("inline", self.sp_metadata)
        entity = re.search(r'entityID="([^"]+)"', self.sp_metadata).group(1)
        self.server.metadata.load("inline", self.sp_metadata.replace(entity, OTHER_SP))  # for wrong-audience answers

    def _server(self, minutes: int) -> Server:
        config = IdPConfig()
        config.load({
            "entityid": self.entity_id,
            "xmlsec_binary": shutil.which("xmlsec1"),
            "key_file": str(self.key_file),
            "cert_file": str(self.cert_file),
            "service": {"idp": {
                "endpoints": {"single_sign_on_service": [(f"{self.url}/sso", BINDING_HTTP_REDIRECT)]},
                "name_id_format": [NAMEID_FORMAT_PERSISTENT],
                "policy": {"default": {"lifetime": {"minutes": minutes}, "attribute_restrictions": None}},
                "want_authn_requests_signed": False,
            }},
            "metadata": {},
        })
        return Server(config=config)

    def answer(self, request_info: dict, user: User, *, sign: bool = True, audience: str | None = None,
               recipient: str | None = None, expired: bool = False, in_response_to: str | None = None) -> str:
        """The Response XML for `request_info` (a parsed AuthnRequest), as asked."""
        server = self.server
        if expired:  # an assertion issued 20 minutes ago, valid for 10: as a slow or replayed answer is
            server = self._server(minutes=-10)
            server.metadata.load("inline", self.sp_metadata)
        with issued_at(-1200 if expired else 0):
            xml = server.create_authn_response(
                identity={"email": [user.email], "groups": list(user.groups)},
                in_response_to=request_info["id"] if in_response_to is None else in_response_to,
                destination=recipient or request_info["acs"],
                sp_entity_id=audience or request_info["issuer"],
                name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED, text=user.username), userid=user.username,
                authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:Password"},
                sign_assertion=sign, sign_response=False,
            )
        return str(xml)

    def _app(self) -> Flask:
        idp = self
        app = Flask("test-saml-idp")

        @app.get("/metadata")
        def metadata():
            return Response(idp.metadata_file.read_bytes(), content_type="application/samlmetadata+xml")

        @app.route("/sso", methods=["GET", "POST"])
        def sso():
            parsed = idp.server.parse_authn_request(request.args["SAMLRequest"], BINDING_HTTP_REDIRECT).message
            info = {"id": parsed.id, "acs": parsed.assertion_consumer_service_url, "issuer": parsed.issuer.text}
            if request.method == "GET":
                idp.requests.append(info)
                return LOGIN_FORM.format(error="")
            user = idp.users.get(request.form.get("username", ""))
            if user is None or not secrets.compare_digest(user.password, request.form.get("password", "")):
                return Response(LOGIN_FORM.format(error="wrong user or password"), 401)
            form = idp.server.apply_binding(BINDING_HTTP_POST, idp.answer(info, user), destination=info["acs"],
                                            relay_state="", response=True)
            return Response(form["data"], content_type="text/html")

        return app
