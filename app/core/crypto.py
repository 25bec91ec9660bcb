"""AES-256-GCM sealing of secrets at rest (API tokens in the database, JWTs in Redis).

Every sealed value is `nonce (12 bytes) || ciphertext+tag`, stored with the id of the key that
sealed it. The additional authenticated data binds a ciphertext to where it lives (a database row's
id, a Redis key's name): a ciphertext copied to another row or key fails to open instead of
yielding another team's secret. Nonces are random 96-bit values; with one key, NIST SP 800-38D
allows 2**32 seals before the collision risk matters, far beyond what one key sees between
rotations.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
KEY_BYTES = 32
_KID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class DecryptionFailed(Exception):
    """A sealed value could not be opened: unknown key id, tampered or moved ciphertext."""


@dataclass(frozen=True, slots=True)
class Sealed:
    key_id: str
    blob: bytes


class Keyring:
    """Named AES-256 keys; the first one seals, every one opens."""

    __slots__ = ("_aeads", "primary_id")

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("at least one key is needed")
        self.primary_id = keys[0][0]
        self._aeads = {kid: AESGCM(key) for kid, key in keys}

    def __repr__(self) -> str:  # never show key material
        return f"Keyring(primary={self.primary_id!r}, ids={list(self._aeads)!r})"

    @property
    def key_ids(self) -> list[str]:
        return list(self._aeads)

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse `kid:base64-32-bytes[,kid:...]`; error messages name the entry, never the key."""
        keys: list[tuple[str, bytes]] = []
        for n, raw in enumerate(p.strip() for p in spec.split(",")):
            if not raw:
                continue
            kid, sep, b64 = raw.partition(":")
            if not sep or not _KID.match(kid):
                raise ValueError(
                    f"entry {n + 1}: expected `kid:base64-32-bytes` with a key id of "
                    "1-32 letters, digits, '_', '.' or '-'"
                )
            try:
                key = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"key {kid!r}: not valid base64") from None
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r}: must decode to {KEY_BYTES} bytes, got {len(key)}")
            if any(kid == k for k, _ in keys):
                raise ValueError(f"key {kid!r}: duplicate key id")
            keys.append((kid, key))
        if not keys:
            raise ValueError("no keys given")
        return cls(keys)

    @staticmethod
    def generate_spec(kid: str | None = None) -> str:
        kid = kid or f"k{secrets.token_hex(4)}"
        return f"{kid}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + self._aeads[self.primary_id].encrypt(nonce, plaintext, aad)
        return Sealed(self.primary_id, blob)

    def open(self, sealed: Sealed, aad: bytes) -> bytes:
        aead = self._aeads.get(sealed.key_id)
        if aead is None or len(sealed.blob) <= NONCE_BYTES:
            raise DecryptionFailed("sealed value cannot be opened")
        try:
            return aead.decrypt(sealed.blob[:NONCE_BYTES], sealed.blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise DecryptionFailed("sealed value cannot be opened") from None
