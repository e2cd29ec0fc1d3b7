"""The development token issuer: a local ES256 key, tokens minted from it, its JWKS.

A convenience for the embedded default (`custody token --sub crew-analyst ...`), off unless
`identity.dev_issuer.enabled` is set. The key is created on first use with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from addons.engine.config import DevIssuer
from addons.engine.model import AGENT_ATTRIBUTES


def ensure_key(path: str) -> ec.EllipticCurvePrivateKey:
    """Load the issuer key, creating it (atomically, 0600) when it does not exist yet."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
    with open(path, "rb") as fh:
        key = serialization.load_pem_private_key(fh.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: the development issuer key must be an EC P-256 key")
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The public JWK with its RFC 7638 thumbprint as `kid`."""
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    thumb_input = json.dumps(
        {k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True
    )
    kid = base64.urlsafe_b64encode(hashlib.sha256(thumb_input.encode()).digest()).rstrip(b"=")
    return {**jwk, "kid": kid.decode(), "use": "sig", "alg": "ES256"}


def jwks(dev: DevIssuer) -> dict[str, Any]:
    return {"keys": [public_jwk(ensure_key(dev.key_file))]}


def mint(
    dev: DevIssuer,
    subject: str,
    *,
    groups: list[str] | tuple[str, ...] = (),
    ttl: float = 900,
    agent: dict[str, str] | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token for `subject`. The TTL is capped by `dev_issuer.max_ttl`."""
    if ttl <= 0 or ttl > dev.max_ttl:
        raise ValueError(f"ttl must be between 0 and {dev.max_ttl:g} seconds")
    key = ensure_key(dev.key_file)
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": dev.issuer,
        "sub": subject,
        "aud": audience or dev.audience,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl),
        "jti": os.urandom(12).hex(),
        "groups": list(groups),
    }
    for name, value in (agent or {}).items():
        if name not in AGENT_ATTRIBUTES:
            raise ValueError(f"unknown agent attribute {name!r}")
        claims[name] = value
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": public_jwk(key)["kid"]})
