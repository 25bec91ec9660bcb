"""Client API keys: `tvk_<key id>_<secret>`.

The key id (16 hex characters) is public and indexes the row; the secret carries 256 random bits.
The database keeps only the SHA-256 of the whole key: the key is high-entropy, so a slow password
hash would add latency and no security. Digests are compared with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from pydantic import SecretStr

PREFIX = "tvk"
_KEY = re.compile(r"^tvk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key_id: str
    digest: str
    key: SecretStr


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue_key() -> IssuedKey:
    key = f"{PREFIX}_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"
    key_id = key.split("_", 2)[1]
    return IssuedKey(key_id=key_id, digest=digest(key), key=SecretStr(key))


def parse_key_id(key: str) -> str | None:
    """The key id of a well-formed key, or None. Says nothing about validity."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def verify(key: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(key).encode(), stored_digest.encode())
