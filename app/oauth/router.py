"""`POST /oauth/token`: the broker behind an RFC 8693 token-exchange endpoint, so that any OAuth 2.0
client library can fetch Phrase JWTs from tokenvend.

Order of checks: the form (size, media type, repeats, grant type, parameters, target), then client
authentication, then the grant for the team, then the vend. Everything that can go wrong becomes an
RFC 6749 5.2 error body here (not a problem document: OAuth clients parse `error`).

Decisions (see docs/oauth.md for the user-facing version):

- Client authentication, exactly one of: HTTP Basic (`client_secret_basic`), `client_id` +
  `client_secret` in the form (`client_secret_post`), or, for token exchange only, the key as the
  `subject_token`. The secret is always the whole API key; `client_id`, wherever it appears, must
  be that key's key id or its client's id. With Basic or post, a token exchange's subject token must
  be the same key: tokenvend does not let one client act for another.
- Failed client authentication: 401 `invalid_client`, always with `WWW-Authenticate: Basic` (RFC
  6749 5.2 requires it when Basic was tried; RFC 9110 15.5.2 requires a challenge on every 401).
- No grant for the team, no such team, no such credential: `invalid_target` (RFC 8693 2.2.2, the
  server is "unwilling or unable to issue a token" for the target). The grant is checked before
  the team is looked up, so a client without a grant gets the same answer whether the team exists
  or not. `unauthorized_client` is about grant types (RFC 6749 5.2), not targets.
- The team's API token refused by Phrase, or disabled by an admin: `invalid_grant` (the grant that
  stands behind the issued token is invalid, and retrying will not help until an admin acts).
- Upstream unavailable, rate-limited or timing out: 503 `temporarily_unavailable` + `Retry-After`;
  the client's own rate limit (shared with the REST API): 429 `temporarily_unavailable`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.http import HTTPBase
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import HTTPConnection

from app.auth import keys
from app.auth.dependencies import TeamNotGranted, admit_key, denial, ensure_team_access
from app.auth.service import Principal
from app.core.deps import InfraDep
from app.core.errors import TokenvendError
from app.core.lifespan import Infra
from app.core.problems import status_of
from app.oauth.schemas import (
    GRANT_TYPE_CLIENT_CREDENTIALS,
    GRANT_TYPE_TOKEN_EXCHANGE,
    MAX_BODY_BYTES,
    REQUEST_BODY,
    REQUESTED_TOKEN_TYPES,
    SUBJECT_TOKEN_TYPES,
    TOKEN_TYPE_ACCESS_TOKEN,
    Form,
    OAuthError,
    OAuthErrorBody,
    OAuthToken,
    invalid_request,
    parse_form,
    parse_min_ttl,
    resolve_target,
)
from app.tokens.schemas import NO_STORE
from app.tokens.service import vend_for

log = logging.getLogger(__name__)

router = APIRouter(tags=["oauth"])

REALM = "tokenvend"
BASIC_CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}


class _BasicSchemeForDocs(HTTPBase):
    """Declares HTTP Basic client authentication in the OpenAPI document (and the /docs
    Authorize dialog) without parsing anything: the route reads the header itself, because a
    malformed one must get an RFC 6749 `invalid_client` body, not FastAPI's own 401."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        return None


basic_scheme = _BasicSchemeForDocs(
    scheme="basic",
    auto_error=False,
    scheme_name="OAuthClientBasic",
    description="OAuth client_secret_basic: user = the key id (or client id), password = the "
    "whole client API key.",
)


def _error_response(exc: OAuthError) -> Response:
    body = OAuthErrorBody(error=exc.error, error_description=exc.description)
    return Response(
        body.model_dump_json(),
        status_code=exc.status,
        media_type="application/json",
        headers={**NO_STORE, **exc.headers},
    )


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, status=401, headers=BASIC_CHALLENGE)


_ERROR_SCHEMA = {"model": OAuthErrorBody}
_HEADER = {"schema": {"type": "string"}}


@router.post(
    "/oauth/token",
    operation_id="oauthToken",
    summary="Get a team's Phrase JWT the OAuth 2.0 way (RFC 8693 token exchange)",
    response_model=None,
    dependencies=[Security(basic_scheme)],
    openapi_extra={"requestBody": REQUEST_BODY, "security": [{}]},
    responses={
        200: {
            "model": OAuthToken,
            "description": "The JWT (RFC 6749 5.1, RFC 8693 2.2.1).",
            "headers": {"Cache-Control": _HEADER, "Pragma": _HEADER},
        },
        400: {
            **_ERROR_SCHEMA,
            "description": "`invalid_request`, `unsupported_grant_type`, `invalid_scope`, "
            "`invalid_target` (no grant for the team, unknown team or credential) or "
            "`invalid_grant` (the team's API token was refused by Phrase or is disabled).",
        },
        401: {
            **_ERROR_SCHEMA,
            "description": "`invalid_client`: client authentication failed.",
            "headers": {"WWW-Authenticate": _HEADER},
        },
        413: {**_ERROR_SCHEMA, "description": "`invalid_request`: the body exceeds 8 KiB."},
        429: {
            **_ERROR_SCHEMA,
            "description": "`temporarily_unavailable`: the client's rate limit is exhausted "
            "(shared with the REST API); retry after `Retry-After` seconds.",
            "headers": {"Retry-After": _HEADER},
        },
        500: {**_ERROR_SCHEMA, "description": "`server_error`."},
        502: {
            **_ERROR_SCHEMA,
            "description": "`server_error`: the Phrase IdM gave an unusable answer.",
        },
        503: {
            **_ERROR_SCHEMA,
            "description": "`temporarily_unavailable`: the Phrase IdM (or a dependency) is "
            "unavailable, rate-limited or timing out; retry after `Retry-After` seconds.",
            "headers": {"Retry-After": _HEADER},
        },
    },
)
async def oauth_token(request: Request, infra: InfraDep) -> Response:
    """An OAuth 2.0 token endpoint over the broker: the same JWT, cache and single flight as
    `GET /v1/teams/{team}/token`, for clients that speak OAuth.

    - `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` with `subject_token` = the
      client API key and `subject_token_type=urn:tokenvend:params:oauth:token-type:client_key`
      (or `urn:ietf:params:oauth:token-type:access_token`), or
    - `grant_type=client_credentials` with the client authenticated by HTTP Basic or
      `client_id` + `client_secret` in the form (the secret is the whole API key).

    The team is named by `audience` or `resource`; `credential` and `min_ttl` are optional
    extensions. Errors are RFC 6749 5.2 JSON (`error`, `error_description`)."""
    try:
        return await _token(request, infra)
    except OAuthError as exc:
        return _error_response(exc)
    except (SQLAlchemyError, RedisError, OSError) as exc:
        log.error("oauth.token.dependency_unavailable error=%s", type(exc).__name__)
        return _error_response(_retry_later(1))


@dataclass(frozen=True, slots=True)
class TokenRequest:
    team: str
    credential: str
    min_ttl: int | None
    subject_token: str | None


async def _token(request: Request, infra: Infra) -> Response:
    form = parse_form(request.headers.get("content-type", ""), await _read_body(request))
    token_request = _validate(form)
    principal = await _authenticate(request, infra, form, token_request)
    team, credential = token_request.team, token_request.credential
    try:
        ensure_team_access(request, principal, team, infra.audit)  # audits the denial
    except TeamNotGranted:
        raise OAuthError(
            "invalid_target", "this client has no grant for the requested team"
        ) from None
    try:
        _, vended = await vend_for(
            request, infra, team, credential, token_request.min_ttl, details={"via": "oauth"}
        )
    except TokenvendError as exc:
        raise _from_domain_error(exc) from None
    jwt = vended.jwt
    body = OAuthToken(
        access_token=jwt.access_token,
        issued_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        token_type="Bearer",
        expires_in=max(0, math.floor(jwt.remaining())),
    )
    return Response(body.model_dump_json(), media_type="application/json", headers=NO_STORE)


async def _read_body(request: Request) -> bytes:
    """The body, read only up to MAX_BODY_BYTES: a token request is a few hundred bytes."""
    too_large = invalid_request(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    return bytes(body)


def _validate(form: Form) -> TokenRequest:
    grant_type = form.get("grant_type")
    if grant_type is None:
        raise invalid_request("grant_type is required")
    if grant_type not in (GRANT_TYPE_TOKEN_EXCHANGE, GRANT_TYPE_CLIENT_CREDENTIALS):
        raise OAuthError(
            "unsupported_grant_type",
            f"grant_type must be {GRANT_TYPE_TOKEN_EXCHANGE} or {GRANT_TYPE_CLIENT_CREDENTIALS}",
        )
    subject_token = None
    if grant_type == GRANT_TYPE_TOKEN_EXCHANGE:
        subject_token = form.get("subject_token")
        if subject_token is None:
            raise invalid_request("subject_token is required for token exchange (RFC 8693 2.1)")
        subject_token_type = form.get("subject_token_type")
        if subject_token_type is None:
            raise invalid_request("subject_token_type is required (RFC 8693 2.1)")
        if subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise invalid_request(
                "subject_token_type must be urn:tokenvend:params:oauth:token-type:client_key "
                "or urn:ietf:params:oauth:token-type:access_token"
            )
        if form.get("actor_token") is not None:
            raise invalid_request("delegation (actor_token) is not supported")
        requested = form.get("requested_token_type")
        if requested is not None and requested not in REQUESTED_TOKEN_TYPES:
            raise invalid_request("requested_token_type must be an access token or a JWT")
    if form.get("scope") is not None:
        raise OAuthError("invalid_scope", "tokenvend issues no scoped tokens; omit scope")
    team, credential = resolve_target(form)
    return TokenRequest(
        team=team,
        credential=credential,
        min_ttl=parse_min_ttl(form.get("min_ttl")),
        subject_token=subject_token,
    )


@dataclass(frozen=True, slots=True)
class _Presented:
    """The client credentials one request carries."""

    key: str
    client_ids: tuple[str, ...]


def _presented(request: Request, form: Form, token_request: TokenRequest) -> _Presented:
    basic = _basic_credentials(request)
    form_secret = form.get("client_secret")
    form_client_id = form.get("client_id")
    if basic is not None and form_secret is not None:
        raise invalid_request("use one client authentication method, not several (RFC 6749 2.3)")
    ids = tuple(i for i in (basic[0] if basic else None, form_client_id) if i is not None)
    if basic is not None:
        return _Presented(basic[1], ids)
    if form_secret is not None:
        if form_client_id is None:
            raise invalid_request("client_secret needs client_id (RFC 6749 2.3.1)")
        return _Presented(form_secret, ids)
    if token_request.subject_token is not None:
        return _Presented(token_request.subject_token, ids)
    raise _invalid_client("client authentication is required: HTTP Basic or client_secret_post")


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, param = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("the Authorization header must use the Basic scheme")
    try:
        decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _invalid_client("malformed Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise _invalid_client("malformed Basic credentials")
    # RFC 6749 2.3.1: client id and secret are form-urlencoded before the Basic encoding. Keys
    # and key ids are unreserved characters only, so clients that skip this step work too.
    return unquote_plus(client_id), unquote_plus(secret)


async def _authenticate(
    request: Request, infra: Infra, form: Form, token_request: TokenRequest
) -> Principal:
    try:
        presented = _presented(request, form, token_request)
    except OAuthError as exc:
        if exc.error == "invalid_client":
            infra.audit.record(denial(request, "unauthenticated", None, None))
        raise
    key = presented.key.strip()
    principal, wait = await admit_key(infra, key)
    if principal is None or not all(_identifies(i, key, principal) for i in presented.client_ids):
        infra.audit.record(denial(request, "unauthenticated", None, None))
        raise _invalid_client("client authentication failed")
    request.state.client = principal
    subject = token_request.subject_token
    # With Basic or post, the subject token is not a second credential but the subject: it must be
    # the authenticated client itself (no acting for another client).
    if subject is not None and not hmac.compare_digest(subject.strip().encode(), key.encode()):
        raise invalid_request("subject_token must be the authenticated client's own API key")
    if wait > 0:
        raise _retry_later(wait, status=429, description=RATE_LIMITED)
    return principal


def _identifies(client_id: str, key: str, principal: Principal) -> bool:
    """Whether an OAuth `client_id` names the key's client: its key id or its client id."""
    if hmac.compare_digest(client_id.encode(), (keys.parse_key_id(key) or "").encode()):
        return True
    try:
        return uuid.UUID(client_id) == principal.id
    except ValueError:
        return False


UNAVAILABLE = "the Phrase IdM or a dependency is unavailable; retry later"
RATE_LIMITED = "this client's rate limit is exhausted; retry later"


def _retry_later(
    retry_after: float | None, *, status: int = 503, description: str = UNAVAILABLE
) -> OAuthError:
    """`temporarily_unavailable` (RFC 6749 4.1.2.1; the token endpoint has no better code), with
    503, or 429 for the client's own rate limit so that clients back off on the status too."""
    return OAuthError(
        "temporarily_unavailable",
        description,
        status=status,
        headers={"Retry-After": str(max(1, round(retry_after or 1)))},
    )


def _from_domain_error(exc: TokenvendError) -> OAuthError:
    """The REST status of a vend failure (`app.core.problems`), translated to RFC 6749 5.2.

    Descriptions are the error's fixed title and stable code, never its detail (which may name
    the team or credential)."""
    status = status_of(exc)
    what = f"{exc.title.lower()} ({exc.code})"
    if status == 404:
        return OAuthError("invalid_target", what)
    if status in (409, 424):
        # Retrying will not help: Phrase refused the stored API token, or an admin disabled it.
        return OAuthError(
            "invalid_grant", f"{what}: the team's API token is unusable until an admin acts"
        )
    if status in (429, 503, 504):
        retry_after: Any = getattr(exc, "retry_after", None)
        seconds = retry_after if isinstance(retry_after, int | float) else None
        if status == 429:
            return _retry_later(seconds, status=429, description=RATE_LIMITED)
        return _retry_later(seconds)
    if status == 422:
        return invalid_request(what)
    if status == 502:
        return OAuthError("server_error", what, status=502)
    return OAuthError("server_error", what, status=500)
