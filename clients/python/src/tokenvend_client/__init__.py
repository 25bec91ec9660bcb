"""tokenvend-client: a team's Phrase JWT from tokenvend, cached locally until shortly before it
expires, with one request in flight per (team, credential), and `PhraseAuth` for httpx."""

from tokenvend_client.auth import PhraseAuth
from tokenvend_client.client import (
    AsyncTokenVendClient,
    TokenVendClient,
    VendedToken,
    __version__,
    sha256_hex,
)
from tokenvend_client.errors import (
    CredentialRejected,
    Forbidden,
    NotFound,
    RateLimited,
    TokenVendError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "AsyncTokenVendClient",
    "CredentialRejected",
    "Forbidden",
    "NotFound",
    "PhraseAuth",
    "RateLimited",
    "TokenVendClient",
    "TokenVendError",
    "Unauthorized",
    "Unavailable",
    "VendedToken",
    "__version__",
    "sha256_hex",
]
