"""Errors raised by the tokenvend client.

Every failure is a `TokenVendError` built from tokenvend's RFC 9457 problem body (`code`,
`detail`, `request_id`); the subclasses name the cases a caller handles differently:

    TokenVendError          anything else (409 credential-disabled, 422, 502, bad responses)
    +-- Unauthorized        401: the client API key is missing, unknown, disabled or rotated away
    +-- Forbidden           403: the key has no grant for the team (or is not an admin)
    +-- NotFound            404: no such team or credential
    +-- CredentialRejected  424: Phrase refused the team's API token; only an admin rotation helps
    +-- Unavailable         503/504, or tokenvend unreachable (`status` None); see `retry_after`
        +-- RateLimited     429

The text and repr of an error never carry the client API key or a JWT: tokenvend does not put
them in problem bodies, and anything that looks like either is masked here as well.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from typing import Any

import httpx

# Three base64url segments, the first a JSON object: `{"` encodes as `eyJ`.
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]+\.[\w-]*")
_API_KEY = re.compile(r"tvk_[\w-]+")
_MAX_DETAIL = 500
REDACTED = "[redacted]"


def redact(text: str, *secrets: str) -> str:
    """`text` without the given secrets, tokenvend API keys or anything shaped like a JWT."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _API_KEY.sub(REDACTED, _JWT.sub(REDACTED, text))


class TokenVendError(Exception):
    """tokenvend answered with an error (or could not be asked: then `status` is None)."""

    def __init__(
        self, status: int | None, code: str, detail: str, request_id: str | None = None
    ) -> None:
        super().__init__(status, code, detail, request_id)
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (request_id={self.request_id})" if self.request_id else ""
        status = "" if self.status is None else f"{self.status} "
        return f"{status}{self.code}: {self.detail}{where}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"detail={self.detail!r}, request_id={self.request_id!r})"
        )


class Unauthorized(TokenVendError):
    """401: the client API key is missing, malformed, unknown, disabled, deleted or rotated."""


class Forbidden(TokenVendError):
    """403: the client has no grant for the team (the same answer whether or not it exists)."""


class NotFound(TokenVendError):
    """404: no such team or credential."""


class CredentialRejected(TokenVendError):
    """424: Phrase refused the team's API token; retrying helps only after an admin rotates it."""


class Unavailable(TokenVendError):
    """503/504: tokenvend or Phrase is unavailable or slow; try again after `retry_after` seconds
    when it is given. `status` is None when tokenvend itself could not be reached."""

    def __init__(
        self,
        status: int | None,
        code: str,
        detail: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, detail, request_id)
        self.args = (status, code, detail, request_id, retry_after)
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, retry_after={self.retry_after!r})"


class RateLimited(Unavailable):
    """429: this client asks too often; wait `retry_after` seconds."""


_BY_STATUS: dict[int, type[TokenVendError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    424: CredentialRejected,
    429: RateLimited,
    503: Unavailable,
    504: Unavailable,
}


def _retry_after(value: str | None) -> float | None:
    """RFC 9110 10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def error_from_response(response: httpx.Response, *secrets: str) -> TokenVendError:
    """The exception for a non-2xx answer whose body has been read."""
    status = response.status_code
    code, detail = f"http-{status}", f"HTTP {status} without a problem body"
    request_id = response.headers.get("x-request-id")
    body: Any
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str) and body["code"]:
            code = body["code"]
        if isinstance(body.get("detail"), str):
            detail = body["detail"]
        if isinstance(body.get("request_id"), str):
            request_id = body["request_id"]
    detail = redact(detail, *secrets)[:_MAX_DETAIL]
    cls = _BY_STATUS.get(status, TokenVendError)
    if issubclass(cls, Unavailable):
        return cls(
            status, code, detail, request_id, _retry_after(response.headers.get("retry-after"))
        )
    return cls(status, code, detail, request_id)


def error_from_transport(exc: httpx.TransportError, *secrets: str) -> Unavailable:
    """tokenvend could not be asked: connection refused, timeout, TLS, protocol errors."""
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "unreachable"
    detail = redact(f"tokenvend did not answer: {type(exc).__name__}: {exc}", *secrets)
    return Unavailable(None, code, detail[:_MAX_DETAIL])
