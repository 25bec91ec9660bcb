"""The Phrase Platform IdM client: exchanges an API token for a JWT (RFC 8693 token exchange).

Every upstream failure is translated here, at the edge, into one of these exceptions; callers never
see an httpx exception or an upstream body:

    UpstreamError (app.core.errors)
    ├── CredentialRejected     `credential-rejected`: the IdM refused the API token (400/401 with
    │                          `invalid_grant` or `invalid_request`, or any 401). Permanent until
    │                          the token is rotated; retrying does not help.
    ├── UpstreamUnavailable    `upstream-unavailable`: 429, 5xx or a transport error. Transient;
    │   │                      carries `status` and the capped `retry_after`.
    │   └── UpstreamTimeout    `upstream-timeout`: no complete answer within the deadline.
    └── UpstreamBadResponse    `upstream-bad-response`: an answer that is not a valid token response
                               (a redirect, HTML, an oversized body, missing or absurd fields) or
                               another 4xx, which means our request is wrong.

No detail ever contains the API token, the JWT or the upstream body: only a short description, the
region and the HTTP status. `CredentialRejected.upstream_error` is taken from a fixed allow-list.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from app.core.config import Region
from app.core.errors import UpstreamError

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_API_TOKEN = "urn:phrase:params:oauth:token-type:api_token"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"

MAX_RETRY_AFTER_SECONDS = 60.0
MAX_EXPIRES_IN_SECONDS = 86400

_KNOWN_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_request", "invalid_client", "unauthorized_client"}
)
_REJECTING_OAUTH_ERRORS = frozenset({"invalid_grant", "invalid_request"})
# RFC 6750 b64token: a value that cannot go into an Authorization header is no usable token.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class CredentialRejected(UpstreamError):
    code = "credential-rejected"
    title = "Credential rejected"

    def __init__(
        self,
        detail: str | None = None,
        *,
        upstream_error: str = "unknown",
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.upstream_error = upstream_error if upstream_error in _KNOWN_OAUTH_ERRORS else "unknown"
        self.status = status


class UpstreamUnavailable(UpstreamError):
    code = "upstream-unavailable"
    title = "Upstream unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.retry_after = retry_after


class UpstreamTimeout(UpstreamUnavailable):
    code = "upstream-timeout"
    title = "Upstream timeout"


class UpstreamBadResponse(UpstreamError):
    code = "upstream-bad-response"
    title = "Bad upstream response"

    def __init__(self, detail: str | None = None, *, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True, slots=True)
class ExchangedToken:
    access_token: str = field(repr=False)
    expires_in: int
    token_type: str
    issued_token_type: str
    requested_at: float  # time.time() just before the request was sent: the lifetime starts here


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or HTTP-date, RFC 9110 10.2.3),
    capped at MAX_RETRY_AFTER_SECONDS so that a hostile or broken upstream cannot park us."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            date = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if date.tzinfo is None:  # RFC 9110 dates are GMT; an unzoned one is garbage
            return None
        seconds = max(0.0, date.timestamp() - (time.time() if now is None else now))
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def build_http_client(
    *, connect_timeout: float, timeout: float, user_agent: str = "tokenvend"
) -> httpx.AsyncClient:
    """The AsyncClient for the IdM: explicit timeouts, no redirects, no proxy/netrc from the env."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=10, keepalive_expiry=30),
        follow_redirects=False,
        # Environment proxies or a ~/.netrc must not silently reroute or decorate token traffic.
        trust_env=False,
        headers={"User-Agent": user_agent},
    )


class PhraseIdmClient:
    """One token exchange per call, no retries (the broker decides when to try again).

    httpx's timeouts bound each phase (connect, each read), not a body that trickles in byte by
    byte, so `total_timeout` puts a deadline on the whole exchange.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_urls: Mapping[Region, str],
        *,
        max_response_bytes: int = 65536,
        total_timeout: float = 10.0,
    ) -> None:
        self._http = http
        self._token_urls = {
            region: f"{url.rstrip('/')}/oauth/token" for region, url in base_urls.items()
        }
        self._max_response_bytes = max_response_bytes
        self._total_timeout = total_timeout

    async def exchange(self, region: Region, api_token: str) -> ExchangedToken:
        url = self._token_urls[region]
        form = {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": api_token,
            "subject_token_type": TOKEN_TYPE_API_TOKEN,
            "requested_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        }
        idm = f"Phrase IdM ({region.value})"
        requested_at = time.time()
        try:
            async with (
                asyncio.timeout(self._total_timeout),
                self._http.stream(
                    "POST", url, data=form, headers={"Accept": "application/json"}
                ) as response,
            ):
                return await self._read_token(idm, response, requested_at)
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise UpstreamTimeout(f"{idm} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{idm} unreachable ({type(exc).__name__})") from exc
        except httpx.DecodingError as exc:
            raise UpstreamBadResponse(f"{idm} sent an undecodable body") from exc

    async def _read_token(
        self, idm: str, response: httpx.Response, requested_at: float
    ) -> ExchangedToken:
        status = response.status_code
        if 300 <= status < 400:
            raise UpstreamBadResponse(
                f"{idm} answered with a redirect (HTTP {status}), which is not followed",
                status=status,
            )
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(
                f"{idm} is unavailable (HTTP {status})",
                status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status in (400, 401):
            error = _oauth_error(await self._read_json(idm, response, strict=False))
            if status == 401 or error in _REJECTING_OAUTH_ERRORS:
                raise CredentialRejected(
                    f"{idm} rejected the API token: {error or 'unknown error'} (HTTP {status})",
                    upstream_error=error or "unknown",
                    status=status,
                )
        if status != 200:
            raise UpstreamBadResponse(f"{idm} answered an unexpected HTTP {status}", status=status)
        return _token_from(idm, await self._read_json(idm, response, strict=True), requested_at)

    async def _read_json(self, idm: str, response: httpx.Response, *, strict: bool) -> object:
        """The parsed body; with strict=False an unreadable body is None instead of an error."""
        status = response.status_code
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self._max_response_bytes:
                raise UpstreamBadResponse(
                    f"{idm} sent a body over {self._max_response_bytes} bytes (HTTP {status})",
                    status=status,
                )
        try:
            return json.loads(body)
        except ValueError:  # also UnicodeDecodeError
            if not strict:
                return None
            # from None: a JSONDecodeError carries the whole upstream body in `.doc`.
            raise UpstreamBadResponse(
                f"{idm} sent a non-JSON body (HTTP {status})", status=status
            ) from None


def _oauth_error(body: object) -> str | None:
    """The RFC 6749 5.2 `error` code, only if it is a known one (upstream text is never echoed)."""
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) and error in _KNOWN_OAUTH_ERRORS else None


def _token_from(idm: str, body: object, requested_at: float) -> ExchangedToken:
    def bad(what: str) -> UpstreamBadResponse:
        return UpstreamBadResponse(
            f"{idm} sent a token response with {what} (HTTP 200)", status=200
        )

    if not isinstance(body, dict):
        raise bad("a body that is not a JSON object")
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise bad("no access_token")
    if not _B64TOKEN.fullmatch(access_token):
        raise bad("a malformed access_token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise bad("a token_type other than Bearer")
    expires_in = body.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, int):
        raise bad("a non-integer expires_in")
    if not 1 <= expires_in <= MAX_EXPIRES_IN_SECONDS:
        raise bad(f"expires_in outside 1..{MAX_EXPIRES_IN_SECONDS}")
    issued_token_type = body.get("issued_token_type", TOKEN_TYPE_ACCESS_TOKEN)
    if not isinstance(issued_token_type, str):
        raise bad("a non-string issued_token_type")
    return ExchangedToken(
        access_token=access_token,
        expires_in=expires_in,
        token_type="Bearer",
        issued_token_type=issued_token_type,
        requested_at=requested_at,
    )
