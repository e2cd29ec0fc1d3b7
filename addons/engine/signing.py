"""signing: the Ed25519 key that signs audit checkpoints and export manifests.

A hash chain proves the log was not edited; it cannot prove that a pruned prefix or an
exported bundle came from this gateway, because anyone can compute SHA-256. A signature can.
The private key sits where `store.signing_key` says (by default a 0600 file created beside
the audit store); auditors pin its public key (`store.verify_key`, or `--public-key`) so a
forger with write access to the store cannot substitute a key of their own.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from addons.engine.model import canonical_json


class SigningError(Exception):
    """The key cannot be read or created, or a signature does not hold."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class Signature:
    key_id: str
    public_key: str  # base64 of the raw 32-byte key
    signature: str   # base64 of the signature over canonical_json(document)

    def as_dict(self) -> dict[str, str]:
        return {"key_id": self.key_id, "public_key": self.public_key, "signature": self.signature}


class Signer:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def open(cls, path: str, create: bool = True) -> Signer:
        """The key at `path`; created (mode 0600, never overwritten) when missing and `create`."""
        p = Path(path)
        if not p.exists():
            if not create:
                raise SigningError(f"no signing key at {path}")
            p.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            try:
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another process created it first: use theirs
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
        try:
            private = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise SigningError(f"signing key {path}: {e}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningError(f"signing key {path}: not an Ed25519 private key")
        return cls(private)

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, document: dict[str, Any]) -> Signature:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return Signature(self.key_id, _b64(raw), _b64(self.private.sign(canonical_json(document).encode())))


def load_public(path: str) -> Ed25519PublicKey:
    """A pinned public key: a PEM public key, or the private key file itself."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningError(f"public key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except ValueError:
            raise SigningError(f"public key {path}: not a PEM public or private key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"public key {path}: not an Ed25519 key")
    return key


def check(document: dict[str, Any], signature: dict[str, str], pinned: Ed25519PublicKey | None) -> str:
    """Check `signature` over `document`; returns the key id it holds under, or raises.
    With `pinned`, the signature must be by that key."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(signature["public_key"]))
        public.verify(base64.b64decode(signature["signature"]), canonical_json(document).encode())
    except (KeyError, ValueError, TypeError, InvalidSignature):
        raise SigningError("the signature does not match the document") from None
    kid = key_id(public)
    if kid != signature.get("key_id"):
        raise SigningError(f"the signature names key {signature.get('key_id')} but was made by {kid}")
    if pinned is not None and key_id(pinned) != kid:
        raise SigningError(f"signed by {kid}, not by the pinned key {key_id(pinned)}")
    return kid
