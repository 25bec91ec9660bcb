"""Domain exceptions.

Services raise these; they know nothing about HTTP. `app.core.problems` renders every one of them
as an RFC 9457 problem. Each class carries a stable kebab-case `code` and a human `title`; the
`detail` passed at raise time must never contain a secret (an API token, a key, a JWT) or an
upstream response body.
"""

from __future__ import annotations


class TokenvendError(Exception):
    code = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if code is not None:
            self.code = code


class NotFound(TokenvendError):
    code = "not-found"
    title = "Not found"


class Conflict(TokenvendError):
    code = "conflict"
    title = "Conflict"


class InvalidInput(TokenvendError):
    code = "invalid-input"
    title = "Invalid input"


class AuthenticationFailed(TokenvendError):
    code = "unauthenticated"
    title = "Authentication required"


class PermissionDenied(TokenvendError):
    code = "forbidden"
    title = "Forbidden"


class DependencyUnavailable(TokenvendError):
    """The database (or another dependency the request cannot do without) is not answering."""

    code = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DatabaseUnavailable(DependencyUnavailable):
    code = "database-unavailable"
    title = "Database unavailable"


class UpstreamError(TokenvendError):
    """Base of the Phrase IdM failures (see `app.integrations.phrase.client`)."""

    code = "upstream-error"
    title = "Upstream error"
