from __future__ import annotations

from app.core.errors import Conflict, TokenvendError, UpstreamError


class CredentialDisabled(Conflict):
    code = "credential-disabled"
    title = "Credential disabled"


class TokenLifetimeTooShort(UpstreamError):
    """Even a fresh JWT from the upstream lives shorter than the caller's `min_ttl`."""

    code = "upstream-lifetime-too-short"
    title = "Upstream JWT lifetime too short"


class CredentialUnreadable(TokenvendError):
    """The stored API token does not decrypt: its key left the keyring, or the row was altered."""

    code = "credential-unreadable"
    title = "Credential cannot be decrypted"
