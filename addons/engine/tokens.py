"""OIDC token verification: trusted issuers, cached JWKS with key rotation, claims to Principal.

Every failure is a `TokenError` with a short reason a human can act on ("token expired",
"unknown signing key id ..."). Nothing here trusts a token field before the signature is
checked, except to choose which issuer's keys and which allowed algorithm to check it with.

JWKS documents are fetched off the event loop (a thread running urllib), cached per issuer,
refreshed periodically in the background and on an unknown `kid` (at most once per
`jwks_min_interval`, shared by concurrent requests). When the endpoint is down, the keys
already cached keep working and unknown keys fail closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from addons.engine import devissuer, metrics
from addons.engine.config import IdentityConfig, Issuer
from addons.engine.model import Principal

logger = logging.getLogger(__name__)

_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


class TokenError(Exception):
    """The token was refused; `str(e)` is the reason given to the client and the audit log."""


COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]*=*")
"""Three base64url segments and two dots (RFC 7515 §7.1; an unsigned token's last is empty)."""


def well_formed(token: str) -> bool:
    """Is `token` shaped as a JWT at all? Checked before anything parses it, and before a
    bridge puts it in a header: whatever else a client sends as its token (other bytes,
    spaces, line breaks) is a malformed token, never a failure of the parser or a broken
    request head."""
    return COMPACT_JWS.fullmatch(token) is not None


def _key_fits(alg: str, key: Any) -> bool:
    """Does this public key belong to this algorithm's family? Stops algorithm confusion."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


@dataclass(frozen=True)
class SigningKey:
    """A public key and the algorithm its JWK declares, if it declares one."""

    key: Any
    alg: str | None


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """Signing keys by kid; keys for encryption or of unsupported types are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, SigningKey] = {}
    for n, raw in enumerate(document["keys"]):
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(raw)
        except jwt.PyJWKError as e:
            logger.warning("skipping JWKS key %s: %s", raw.get("kid"), e)
            continue
        keys[str(raw.get("kid", f"#{n}"))] = SigningKey(jwk.key, raw.get("alg"))
    return keys


@dataclass
class KeySet:
    """One issuer's keys, and when they were last fetched."""

    issuer: Issuer
    settings: IdentityConfig
    keys: dict[str, SigningKey] = field(default_factory=dict)
    version: int = 0
    fetched: float = 0.0
    attempted: float = float("-inf")
    last_error: str = ""
    _inflight: asyncio.Future | None = None
    _background: asyncio.Future | None = None
    _fetching: asyncio.Future | None = None

    @property
    def remote(self) -> bool:
        return self.issuer.key_file is None

    def load_local(self) -> None:
        self.keys = parse_jwks({"keys": [devissuer.public_jwk(devissuer.ensure_key(self.issuer.key_file))]})
        self.fetched = time.monotonic()

    def _get_json(self, url: str, deadline: float) -> Any:
        """GET `url` within `deadline` (monotonic): a server that answers a byte at a time
        runs out of time, not just each read (a socket timeout alone bounds only one read)."""
        context = ssl.create_default_context(cafile=self.issuer.ca_file)
        request = urllib.request.Request(url, headers={"accept": "application/json"})
        with urllib.request.urlopen(request, timeout=max(0.1, deadline - time.monotonic()), context=context) as response:
            body = bytearray()
            while chunk := response.read1(65536):
                body += chunk
                if len(body) > 1 << 20:
                    raise ValueError("the document is larger than 1 MiB")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole answer within {self.settings.jwks_timeout:g}s")
            return json.loads(body)

    def _fetch(self, deadline: float) -> dict[str, SigningKey]:
        url = self.issuer.jwks_url
        if not url:
            discovery = self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
            url = self._get_json(discovery, deadline)["jwks_uri"]
        return parse_jwks(self._get_json(url, deadline))

    async def refresh(self) -> None:
        """Fetch the JWKS once; concurrent callers share the same fetch, which ends by
        `jwks_timeout` whatever the identity provider does (the fetching thread may finish
        later; no second one starts meanwhile)."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return
        self._inflight = asyncio.get_running_loop().create_future()
        self.attempted = time.monotonic()
        try:
            if self._fetching is not None and not self._fetching.done():
                raise TimeoutError("the identity provider is still sending its last answer")
            self._fetching = asyncio.ensure_future(asyncio.to_thread(self._fetch, self.attempted + self.settings.jwks_timeout))
            keys = await asyncio.wait_for(asyncio.shield(self._fetching), self.settings.jwks_timeout)
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            logger.warning("JWKS for %s unavailable: %s", self.issuer.issuer, self.last_error)
            metrics.JWKS_REFRESHES.labels(self.issuer.issuer, "error").inc()
        else:
            metrics.JWKS_REFRESHES.labels(self.issuer.issuer, "ok").inc()
            if keys != self.keys:
                self.keys, self.version = keys, self.version + 1
            self.fetched, self.last_error = time.monotonic(), ""
        finally:
            self._inflight.set_result(None)
            self._inflight = None

    def _lookup(self, kid: str | None) -> SigningKey | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def key(self, kid: str | None) -> SigningKey | None:
        """The key for `kid`: fetched now when unknown, refreshed in the background when stale.
        A key already known never waits for a fetch; an unknown one waits for the fetch under
        way (the one at start, say) rather than racing it, at most `jwks_timeout`."""
        if self.remote:
            if self._inflight is not None and self._lookup(kid) is None:
                await asyncio.shield(self._inflight)
            now = time.monotonic()
            may_fetch = now - self.attempted >= self.settings.jwks_min_interval
            if self._lookup(kid) is None and may_fetch:
                await self.refresh()
            elif now - self.fetched > self.settings.jwks_refresh and may_fetch:
                self._background = asyncio.ensure_future(self.refresh())
        return self._lookup(kid)


class Verifier:
    """Verifies tokens against the configured issuers and maps claims to a Principal."""

    CACHE_SIZE = 4096

    def __init__(self, settings: IdentityConfig) -> None:
        self.settings = settings
        self.keysets = {i.issuer: KeySet(i, settings) for i in settings.issuers}
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._generation = self._key_generation()
        for ks in self.keysets.values():
            if not ks.remote:
                ks.load_local()

    async def start(self) -> None:
        """Fetch every remote JWKS once; failures are logged and retried on demand."""
        await asyncio.gather(*(ks.refresh() for ks in self.keysets.values() if ks.remote))

    def _key_generation(self) -> tuple[int, ...]:
        return tuple(ks.version for ks in self.keysets.values())

    def _cached(self, token: str, now: float) -> Principal | None:
        generation = self._key_generation()
        if generation != self._generation:
            self._cache.clear()  # keys changed: re-verify everything against the new set
            self._generation = generation
            return None
        principal = self._cache.get(token)
        if principal is None:
            return None
        leeway = self.keysets[principal.issuer].issuer.leeway
        if principal.expires + leeway <= now:
            del self._cache[token]
            raise TokenError("token expired")
        return principal

    async def verify(self, token: str, now: float | None = None) -> Principal:
        now = time.time() if now is None else now
        if len(token) > self.settings.max_token_bytes:
            raise TokenError(
                f"token too large ({len(token)} bytes, limit {self.settings.max_token_bytes})"
            )
        if (hit := self._cached(token, now)) is not None:
            return hit
        principal = await self._verify(token, now)
        self._cache[token] = principal
        if len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    async def verify_claims(self, token: str, now: float | None = None) -> tuple[Principal, dict[str, Any]]:
        """Verify a token used once (an ID token at sign-in: never cached) and return its
        claims too, for the checks only its user knows (the sign-in's nonce)."""
        claims, issuer = await self._decode(token, time.time() if now is None else now)
        return principal_from(claims, issuer, token), claims

    async def _verify(self, token: str, now: float) -> Principal:
        claims, issuer = await self._decode(token, now)
        return principal_from(claims, issuer, token)

    async def _decode(self, token: str, now: float) -> tuple[dict[str, Any], Issuer]:
        if len(token) > self.settings.max_token_bytes:
            raise TokenError(f"token too large ({len(token)} bytes, limit {self.settings.max_token_bytes})")
        if not well_formed(token):
            raise TokenError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise TokenError("token has no issuer (iss)")
        keyset = self.keysets.get(iss)
        if keyset is None:
            raise TokenError(f"token issuer {iss!r} is not trusted")
        issuer = keyset.issuer
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise TokenError(f"algorithm {alg!r} is not allowed")
        kid = header.get("kid")
        jwk = await keyset.key(kid if isinstance(kid, str) else None)
        if jwk is None:
            detail = f" (JWKS unavailable: {keyset.last_error})" if keyset.last_error else ""
            raise TokenError(f"unknown signing key id {kid!r}{detail}")
        if not _key_fits(alg, jwk.key) or (jwk.alg or alg) != alg:
            raise TokenError(f"algorithm {alg!r} does not match the signing key")
        try:
            claims = jwt.decode(
                token,
                key=jwk.key,
                algorithms=[alg],
                audience=list(issuer.audiences),
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token issuer does not match") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad signature") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token lacks the {e.claim!r} claim") from None
        except jwt.InvalidIssuedAtError:  # a future iat is ImmatureSignatureError (PyJWT 2.10+)
            raise TokenError("token issue time (iat) is not a time") from None
        except jwt.PyJWTError as e:
            raise TokenError(f"invalid token: {e}") from None
        return claims, issuer


def principal_from(claims: dict[str, Any], issuer: Issuer, token: str) -> Principal:
    groups = claims.get(issuer.groups_claim, [])
    if isinstance(groups, str):
        groups = groups.split()
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise TokenError(f"claim {issuer.groups_claim!r} is not a list of group names")
    agent = {}
    for attribute, claim in issuer.agent_claims.items():
        value = claims.get(claim)
        if isinstance(value, (str, int, float)) and value != "":
            agent[attribute] = str(value)
    return Principal(
        subject=str(claims["sub"]),
        issuer=issuer.issuer,
        groups=tuple(groups),
        agent=agent,
        token_id=str(claims.get("jti", "")),
        token_fingerprint=hashlib.sha256(token.encode()).hexdigest()[:32],
        expires=expiry(claims["exp"]),
    )


def expiry(exp: Any) -> float:
    """`exp` as a time: PyJWT checked that int() takes it, which an integer too large for a
    float also passes."""
    try:
        return float(exp)
    except (TypeError, ValueError, OverflowError):
        raise TokenError("token expiry (exp) is not a time") from None
