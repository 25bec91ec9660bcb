"""The wire format of `POST /oauth/token`: the form it reads, the JSON it answers, the errors.

The form is parsed by hand (python-multipart is not a dependency, and OAuth's rules differ from
FastAPI's form handling anyway): RFC 6749 3.2 forbids repeating a parameter, RFC 6749 3.1 treats
an empty one as absent, and RFC 8693 2.1 lets `audience` and `resource` repeat.

Every error here is an `OAuthError`: an RFC 6749 5.2 error code with a fixed description. No
description ever contains a request value (a key, a subject token, a slug).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, Field

from app.core.schemas import SLUG_PATTERN

GRANT_TYPE_TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE_CLIENT_CREDENTIALS: Final = "client_credentials"
TOKEN_TYPE_CLIENT_KEY: Final = "urn:tokenvend:params:oauth:token-type:client_key"
TOKEN_TYPE_ACCESS_TOKEN: Final = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_JWT: Final = "urn:ietf:params:oauth:token-type:jwt"
TEAM_URN_PREFIX: Final = "urn:tokenvend:team:"

SUBJECT_TOKEN_TYPES: Final = frozenset({TOKEN_TYPE_CLIENT_KEY, TOKEN_TYPE_ACCESS_TOKEN})
# What tokenvend issues is a Phrase JWT used as a bearer access token: either name fits it.
REQUESTED_TOKEN_TYPES: Final = frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT})

FORM_MEDIA_TYPE: Final = "application/x-www-form-urlencoded"
MAX_BODY_BYTES: Final = 8 * 1024
MAX_FIELDS: Final = 32
MAX_MIN_TTL: Final = 3600
DEFAULT_CREDENTIAL: Final = "default"

KNOWN_PARAMETERS: Final = frozenset(
    {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "actor_token",
        "actor_token_type",
        "audience",
        "resource",
        "scope",
        "credential",
        "min_ttl",
        "client_id",
        "client_secret",
    }
)
MULTI_VALUED: Final = frozenset({"audience", "resource"})  # RFC 8693 2.1

_SLUG = re.compile(SLUG_PATTERN)

ErrorCode = Literal[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "invalid_target",
    "unsupported_grant_type",
    "server_error",
    "temporarily_unavailable",
]


class OAuthError(Exception):
    """An RFC 6749 5.2 error response: code, fixed description, HTTP status, extra headers."""

    def __init__(
        self,
        error: ErrorCode,
        description: str,
        *,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status
        self.headers = headers or {}


def invalid_request(description: str, *, status: int = 400) -> OAuthError:
    return OAuthError("invalid_request", description, status=status)


def invalid_target(description: str) -> OAuthError:
    return OAuthError("invalid_target", description)


@dataclass(frozen=True, slots=True)
class Form:
    """A parsed token request: each parameter's non-empty values (one, unless multi-valued)."""

    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else None

    def getall(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))


def parse_form(content_type: str, body: bytes) -> Form:
    if content_type.split(";", 1)[0].strip().lower() != FORM_MEDIA_TYPE:
        raise invalid_request(f"the request body must be {FORM_MEDIA_TYPE} (RFC 6749 3.2)")
    try:
        text = body.decode("utf-8")
        parsed = parse_qs(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the request body is not a well-formed UTF-8 form") from None
    for name, values in parsed.items():
        if len(values) > 1 and name not in MULTI_VALUED:
            # Only a parameter tokenvend defines is named back; anything else is the caller's input.
            which = name if name in KNOWN_PARAMETERS else "a parameter"
            raise invalid_request(f"{which} is repeated; RFC 6749 3.2 allows each parameter once")
    # RFC 6749 3.1: a parameter sent without a value is treated as if it were omitted.
    return Form({name: [v for v in values if v] for name, values in parsed.items() if any(values)})


def parse_min_ttl(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 4) or int(value) > MAX_MIN_TTL:
        raise invalid_request(f"min_ttl must be an integer number of seconds, 0 to {MAX_MIN_TTL}")
    return int(value)


@dataclass(frozen=True, slots=True)
class Target:
    team: str
    credential: str | None = None


def parse_target(value: str) -> Target:
    """A team (and maybe a credential) from one `audience` or `resource` value: a team slug,
    `urn:tokenvend:team:<team>[:<credential>]`, or an http(s) URI whose last path segment is the
    team slug (`https://tokenvend.example/teams/acme`)."""
    if _SLUG.fullmatch(value):
        return Target(value)
    if value.startswith(TEAM_URN_PREFIX):
        parts = value[len(TEAM_URN_PREFIX) :].split(":")
        if len(parts) <= 2 and all(_SLUG.fullmatch(p) for p in parts):
            return Target(parts[0], parts[1] if len(parts) == 2 else None)
        raise invalid_target("a team URN must be urn:tokenvend:team:<team>[:<credential>]")
    try:
        uri = urlsplit(value)
    except ValueError:
        uri = None
    if uri is not None and uri.scheme in ("http", "https") and uri.netloc and not uri.fragment:
        segments = [s for s in uri.path.split("/") if s]
        if segments and _SLUG.fullmatch(segments[-1]):
            return Target(segments[-1])
    raise invalid_target(
        "audience and resource take a team slug, urn:tokenvend:team:<team>[:<credential>] "
        "or an http(s) URI ending in the team slug"
    )


def resolve_target(form: Form) -> tuple[str, str]:
    """The one team and credential that `audience`, `resource` and `credential` name together."""
    values = form.getall("audience") + form.getall("resource")
    if not values:
        raise invalid_target("name the team in audience or resource (RFC 8693 2.1)")
    targets = [parse_target(v) for v in values]
    if len({t.team for t in targets}) > 1:
        raise invalid_target("a token is for exactly one team; the targets name several")
    credentials = {t.credential for t in targets if t.credential is not None}
    explicit = form.get("credential")
    if explicit is not None:
        if not _SLUG.fullmatch(explicit):
            raise invalid_target("credential must be a credential name (a slug)")
        credentials.add(explicit)
    if len(credentials) > 1:
        raise invalid_target("the request names more than one credential")
    return targets[0].team, credentials.pop() if credentials else DEFAULT_CREDENTIAL


# --- responses (OpenAPI) ------------------------------------------------------------------------


class OAuthToken(BaseModel):
    """RFC 6749 5.1 / RFC 8693 2.2.1 successful token response."""

    access_token: str = Field(
        description="The Phrase JWT.", examples=["eyJhbGciOiJSUzI1NiJ9.e30.c2ln"]
    )
    issued_token_type: Literal["urn:ietf:params:oauth:token-type:access_token"] = (
        TOKEN_TYPE_ACCESS_TOKEN
    )
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int = Field(
        description="Seconds of life left at the time of the response.", examples=[13950]
    )


class OAuthErrorBody(BaseModel):
    """RFC 6749 5.2 error response."""

    error: ErrorCode = Field(examples=["invalid_target"])
    error_description: str = Field(
        description="A fixed, human-readable explanation; never contains request values.",
        examples=["name the team in audience or resource (RFC 8693 2.1)"],
    )


_TARGET_FORMS = (
    "A team slug (`acme`), `urn:tokenvend:team:<team>[:<credential>]`, or an http(s) URI whose "
    "last path segment is the team slug (`https://tokenvend.example/teams/acme`). Repeating "
    "it is allowed (RFC 8693) but every value must name the same team."
)

_EXAMPLE_KEY = "tvk_0123456789abcdef_" + "x" * 43

REQUEST_BODY: Final[dict[str, Any]] = {
    "required": True,
    "content": {
        FORM_MEDIA_TYPE: {
            "schema": {
                "type": "object",
                "required": ["grant_type"],
                "properties": {
                    "grant_type": {
                        "type": "string",
                        "enum": [GRANT_TYPE_TOKEN_EXCHANGE, GRANT_TYPE_CLIENT_CREDENTIALS],
                        "description": "RFC 8693 token exchange, or `client_credentials` as a "
                        "convenience (the client authenticates with its key; no subject token).",
                    },
                    "subject_token": {
                        "type": "string",
                        "format": "password",
                        "description": "Token exchange only (required there): the client's API "
                        "key `tvk_<key id>_<secret>`. Alone it authenticates the client; with "
                        "Basic or client_secret_post it must be the same key.",
                    },
                    "subject_token_type": {
                        "type": "string",
                        "enum": sorted(SUBJECT_TOKEN_TYPES),
                        "description": "Token exchange only (required there).",
                    },
                    "requested_token_type": {
                        "type": "string",
                        "enum": sorted(REQUESTED_TOKEN_TYPES),
                        "description": "Optional; the issued token is always a Phrase JWT "
                        "reported as an access token.",
                    },
                    "audience": {
                        "type": "string",
                        "description": _TARGET_FORMS,
                        "examples": ["acme"],
                    },
                    "resource": {
                        "type": "string",
                        "description": _TARGET_FORMS,
                        "examples": ["urn:tokenvend:team:acme:default"],
                    },
                    "credential": {
                        "type": "string",
                        "pattern": SLUG_PATTERN,
                        "description": "Extension: the team's credential name (default `default`).",
                    },
                    "min_ttl": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": MAX_MIN_TTL,
                        "description": "Extension: minimum remaining lifetime in seconds "
                        "(default from settings).",
                    },
                    "client_id": {
                        "type": "string",
                        "description": "client_secret_post: the key id (the 16 hex characters "
                        "after `tvk_`, `key_id` in the client view) or the client's id.",
                    },
                    "client_secret": {
                        "type": "string",
                        "format": "password",
                        "description": "client_secret_post: the whole API key.",
                    },
                },
            },
            "examples": {
                "token-exchange": {
                    "summary": "Token exchange, the key as subject token",
                    "value": {
                        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
                        "subject_token": _EXAMPLE_KEY,
                        "subject_token_type": TOKEN_TYPE_CLIENT_KEY,
                        "audience": "acme",
                    },
                },
                "client-credentials": {
                    "summary": "Client credentials (client_secret_post), a named credential",
                    "value": {
                        "grant_type": GRANT_TYPE_CLIENT_CREDENTIALS,
                        "client_id": "0123456789abcdef",
                        "client_secret": _EXAMPLE_KEY,
                        "resource": "urn:tokenvend:team:acme:default",
                        "min_ttl": 600,
                    },
                },
            },
        },
    },
}
