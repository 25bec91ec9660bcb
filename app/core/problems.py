"""Every error leaves as an RFC 9457 `application/problem+json` body with `code` and `request_id`.

Domain exceptions map to a status here and nowhere else. Bodies never carry a secret: validation
errors are reported without the offending input (FastAPI echoes it by default), and unexpected
exceptions become a bare 500 whose details only reach the log.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from redis.exceptions import RedisClusterException, RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.auth.ratelimit import RateLimited
from app.core import errors
from app.integrations.phrase.client import (
    CredentialRejected,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://tokenvend.dev/problems/"


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = Field(examples=[f"{TYPE_BASE}team-not-found"])
    title: str = Field(examples=["Team not found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["no team 'acme'"])
    code: str = Field(
        description="Stable machine-readable error code.", examples=["team-not-found"]
    )
    request_id: str | None = Field(examples=["6f1c2e7a9b8d4c3e"])
    errors: list[dict[str, Any]] | None = Field(
        None, description="Validation errors (422 only): location, message, type; never the input."
    )


# Most specific first: the first match wins.
STATUS: list[tuple[type[errors.TokenvendError], int]] = [
    (CredentialRejected, 424),
    (UpstreamTimeout, 504),
    (UpstreamUnavailable, 503),
    (UpstreamBadResponse, 502),
    (errors.UpstreamError, 502),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.InvalidInput, 422),
    (errors.AuthenticationFailed, 401),
    (errors.PermissionDenied, 403),
    (errors.DependencyUnavailable, 503),
    (RateLimited, 429),
]

HTTP_CODES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthenticated", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    406: ("not-acceptable", "Not acceptable"),
    413: ("payload-too-large", "Payload too large"),
    429: ("rate-limited", "Rate limited"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-failed", "Validation failed"),
    424: ("credential-rejected", "Credential rejected by Phrase"),
    502: ("upstream-bad-response", "Bad answer from Phrase"),
    503: ("service-unavailable", "Unavailable; retry after Retry-After"),
    504: ("upstream-timeout", "Phrase did not answer in time"),
}


def status_of(exc: errors.TokenvendError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem_response(
    request: Request,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": getattr(request.state, "request_id", None),
    }
    if extra:
        body |= extra
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_JSON
    )


async def _domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.TokenvendError)
    status = status_of(exc)
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tokenvend"'
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503):
        headers["Retry-After"] = str(max(1, round(retry_after or 1)))
    if status == 500:
        log.error("request.failed code=%s", exc.code)
    return problem_response(
        request, status=status, code=exc.code, title=exc.title, detail=exc.detail, headers=headers
    )


def _location(error: dict[str, Any]) -> list[Any]:
    """Where the error is. An unexpected field is named by the caller, not by the schema: its
    name is input too (a secret pasted as a key would come back), so it is not echoed."""
    loc = list(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and loc:
        loc[-1] = "<unexpected field>"
    return loc


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    found = [
        {"loc": _location(e), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return problem_response(
        request,
        status=422,
        code="validation-failed",
        title="Validation failed",
        detail="the request has invalid parameters or body; see `errors`",
        extra={"errors": found},
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code, title = HTTP_CODES.get(exc.status_code, ("http-error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) else title
    return problem_response(
        request,
        status=exc.status_code,
        code=code,
        title=title,
        detail=detail,
        headers=dict(exc.headers or {}),
    )


def _unavailable(code: str, title: str, detail: str) -> Any:
    async def handler(request: Request, exc: Exception) -> Response:
        log.error("%s error=%s", code.replace("-", "."), type(exc).__name__)
        return problem_response(
            request,
            status=503,
            code=code,
            title=title,
            detail=detail,
            headers={"Retry-After": "1"},
        )

    return handler


_database = _unavailable(
    "database-unavailable", "Database unavailable", "the database did not answer in time"
)
_redis = _unavailable("cache-unavailable", "Cache unavailable", "the cache did not answer in time")
_dependency = _unavailable(
    "dependency-unavailable", "Dependency unavailable", "a dependency did not answer in time"
)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("request.unexpected_error error=%s", type(exc).__name__)
    return problem_response(
        request,
        status=500,
        code="internal-error",
        title="Internal error",
        detail="an unexpected error occurred; it has been logged",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.TokenvendError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(SQLAlchemyError, _database)
    app.add_exception_handler(OSError, _dependency)  # includes TimeoutError, ConnectionError
    app.add_exception_handler(RedisError, _redis)
    app.add_exception_handler(RedisClusterException, _redis)
    app.add_exception_handler(Exception, _unexpected)


# What any authenticated route may answer besides its own errors.
AUTHENTICATED = (400, 401, 403, 413, 422, 429, 503)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses, all with the problem schema."""
    return {
        s: {
            "model": Problem,  # registers the schema; `document_problems` drops the JSON twin
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
            "description": HTTP_CODES.get(s, ("", "Error"))[1],
        }
        for s in statuses
    }


def document_problems(spec: dict[str, Any]) -> dict[str, Any]:
    """Errors are sent as application/problem+json only; FastAPI also lists the model under
    application/json, which no error response ever uses."""
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            for code, response in op.get("responses", {}).items():
                content = response.get("content", {})
                if code[0] in "45" and PROBLEM_JSON in content:
                    content.pop("application/json", None)
    return spec
