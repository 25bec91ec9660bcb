"""Everything tokenvend reads from a JWT, behind one small module (python-jose).

Upstream JWTs are treated as opaque: the signature cannot be checked (Phrase publishes no JWKS), so
claims are read only to bound the cache lifetime, never to make an authorization decision.
"""

from __future__ import annotations

import hashlib

from jose import jwt
from jose.exceptions import JOSEError


def unverified_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, without verifying it; None when the token is not a readable JWT."""
    try:
        exp = jwt.get_unverified_claims(token).get("exp")
    except (JOSEError, ValueError, TypeError):
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def fingerprint(token: str) -> str:
    """A short SHA-256 prefix: enough to correlate a JWT in logs and audit, no use to a thief."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]
