"""The approvals page's SAML 2.0 service provider, through pysaml2 (which verifies XML
signatures with the xmlsec1 program).

The request goes out with the HTTP-Redirect binding; the response comes back to the
assertion consumer service with HTTP-POST. What is required of a response: an assertion
signed by the key in the IdP's metadata (an unsigned or altered one is refused), the
audience restriction naming this service provider, the subject confirmation's recipient
being our ACS URL, the validity times, and InResponseTo naming a request this gateway sent
(and has not seen answered: each request is answered once). Which requests are outstanding
is the caller's to keep (addons/signin.py keeps them in the audit store, for every replica). The approver is the NameID, of
the IdP's entity ID, with the groups and e-mail of the configured attributes.

Blocking (xmlsec1 runs as a subprocess): callers on an event loop run it in a thread.
pysaml2 is imported only when SAML is configured: it is slow to import, and its schema
library logs a warning as it loads.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass

from addons.engine.config import SamlSignin
from addons.engine.model import Principal

REQUEST_TTL = 600.0
CLOCK_SKEW = 60  # seconds an assertion's times may be off by
UNSOLICITED = "the response answers no sign-in this gateway started (unsolicited, expired or replayed)"


class SamlError(Exception):
    """A SAML sign-in that cannot be used; the message says which check failed."""


@dataclass(frozen=True)
class SamlIdentity:
    principal: Principal
    email: str
    request: str  # the id of the AuthnRequest the response answers


def in_response_to(encoded: str) -> str:
    """The request id a base64 SAMLResponse says it answers ("" if it cannot be read): which
    outstanding request to look up before the response is verified (which needs it)."""
    import base64
    import binascii

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import ParseError, fromstring

    try:
        return str(fromstring(base64.b64decode(encoded, validate=False)).get("InResponseTo") or "")
    except (binascii.Error, ValueError, ParseError, DefusedXmlException):
        return ""


def _reason(e: Exception) -> str:
    """What a pysaml2 refusal means, in words an operator can act on."""
    from saml2.response import IncorrectlySigned, StatusError, UnsolicitedResponse, VerificationError
    from saml2.sigver import SignatureError
    from saml2.validate import NotValid, ResponseLifetimeExceed, ToEarly

    text = str(e)
    if isinstance(e, (SignatureError, IncorrectlySigned)) or "Signature missing" in text:
        return "the assertion is not signed by the identity provider's key (unsigned or altered)"
    if isinstance(e, ResponseLifetimeExceed) or "Can't use response, too old" in text:
        return "the assertion has expired"
    if isinstance(e, ToEarly) or "Can't use response yet" in text:
        return "the assertion is not valid yet"
    if "Condition not OK" in text:
        return "the assertion's conditions do not hold (its validity times)"
    if "AudienceRestrictions" in text:
        return "the assertion's audience is not this service provider"
    if isinstance(e, VerificationError) and "recipient" in text:
        return "the assertion's recipient is not this service provider's ACS URL"
    if isinstance(e, UnsolicitedResponse):
        return UNSOLICITED
    if isinstance(e, StatusError):
        return f"the identity provider refused the sign-in: {text}"
    if isinstance(e, NotValid):
        return f"the response is not valid: {text}"
    return f"the response could not be verified: {type(e).__name__}: {text}"


class ServiceProvider:
    def __init__(self, settings: SamlSignin, public_url: str) -> None:
        logging.getLogger("xmlschema").setLevel(logging.ERROR)  # "Resource 'XMLSchema.xsd' is already loaded"
        from saml2 import BINDING_HTTP_POST
        from saml2.client import Saml2Client
        from saml2.config import SPConfig

        xmlsec = shutil.which("xmlsec1")
        if xmlsec is None:
            raise SamlError("the xmlsec1 program is not installed (Debian: apt-get install xmlsec1)")
        self.settings = settings
        self.acs = f"{public_url}/auth/saml/acs"
        config = SPConfig()
        try:
            config.load({
                "entityid": settings.entity_id,
                "xmlsec_binary": xmlsec,
                "metadata": {"local": [settings.idp_metadata]},
                "allow_unknown_attributes": True,
                "accepted_time_diff": CLOCK_SKEW,
                "service": {"sp": {
                    "endpoints": {"assertion_consumer_service": [(self.acs, BINDING_HTTP_POST)]},
                    "want_assertions_signed": True,
                    "want_response_signed": False,
                    "allow_unsolicited": False,
                    "authn_requests_signed": False,
                }},
            })
        except Exception as e:  # pysaml2 reports bad metadata with many exception types
            raise SamlError(f"cannot load the IdP metadata {settings.idp_metadata}: {e}") from None
        self.client = Saml2Client(config=config)
        idps = list(self.client.metadata.with_descriptor("idpsso"))
        if len(idps) != 1:
            raise SamlError(f"the IdP metadata must describe exactly one identity provider (found {len(idps)})")
        self.idp = idps[0]

    def login_url(self) -> tuple[str, str]:
        """Where the browser goes to sign in (the IdP, with our AuthnRequest), and the request's id."""
        from saml2 import BINDING_HTTP_REDIRECT

        request_id, info = self.client.prepare_for_authenticate(entityid=self.idp, binding=BINDING_HTTP_REDIRECT)
        return dict(info["headers"])["Location"], request_id

    def accept(self, encoded: str, outstanding: dict[str, float]) -> SamlIdentity:
        """The approver a base64 SAMLResponse (HTTP-POST) vouches for, if it answers one of
        the `outstanding` requests (id: when sent), or SamlError. The caller then marks
        that request answered (`SamlIdentity.request`)."""
        if not encoded:
            raise SamlError("no SAMLResponse in the form")
        from saml2 import BINDING_HTTP_POST

        try:
            response = self.client.parse_authn_request_response(encoded, BINDING_HTTP_POST, outstanding=outstanding)
        except Exception as e:
            raise SamlError(_reason(e)) from None
        if response is None:
            raise SamlError("the response is not addressed to this service provider's ACS URL (Destination)")
        if response.assertion is None:
            destination = getattr(response.response, "destination", None)
            if destination and destination != self.acs:
                raise SamlError("the response's recipient is not this service provider's ACS URL")
            raise SamlError("the response carries no assertion")
        if response.in_response_to not in outstanding:
            raise SamlError(UNSOLICITED)
        attributes = response.get_identity()
        groups = tuple(str(g) for g in attributes.get(self.settings.groups_attribute, []))
        emails = [str(e).lower() for e in attributes.get(self.settings.email_attribute, []) if "@" in str(e)]
        issuer = response.issuer() or self.idp
        return SamlIdentity(Principal(response.name_id.text, issuer, groups), emails[0] if emails else "",
                            response.in_response_to)

    def metadata(self) -> bytes:
        from saml2.metadata import create_metadata_string

        document = create_metadata_string(None, self.client.config, sign=False)
        return document if isinstance(document, bytes) else document.encode()
