"""The development IdM: a faithful stand-in for the Phrase Platform token endpoint.

`POST /oauth/token` behaves as `docs/phrase-platform.md` section 1 describes (form fields and their
defaults, RFC 6749 5.2 error bodies, `invalid_grant` for an unknown subject token) and issues RS256
JWTs signed with a key generated per instance. It accepts any subject token starting with
`ACCEPTED_PREFIX` plus the tokens registered at runtime, minus the revoked ones; API tokens are kept
only as SHA-256 digests.

It can be told to misbehave (slow, 5xx, 429 with `Retry-After`, short lifetimes, garbage) and counts
what it served, in process through `DevIdm` or over HTTP through the `/_dev/*` routes, so that tests
and demos can drive one running in another process. It is mounted by `tokenvend serve --dev` and
runs alone as `tokenvend dev-idm`; it has no authentication and is never meant for production.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from jose import jwk, jwt
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from app.integrations.phrase.client import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_API_TOKEN,
)

ACCEPTED_PREFIX = "phrdev_"
ISSUER = "tokenvend-dev-idm"
HUGE_BODY_BYTES = 1024 * 1024 + 1
_SECRET_FIELDS = frozenset({"subject_token", "actor_token"})
# Token responses must not be cached by anything in between (RFC 6749 5.1).
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

Garbage = Literal["html", "huge", "missing-fields", "bad-expires", "redirect"]


class DevIdmMode(BaseModel):
    """How the IdM misbehaves. A failure is `fail_status` or `garbage`; after `fail_times` failing
    requests the failure fields clear themselves (None: fail until the mode is changed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: int = Field(0, ge=0, le=120_000, description="Sleep before answering.")
    fail_status: int | None = Field(None, ge=400, le=599, description="Answer with this status.")
    fail_times: int | None = Field(None, ge=1, description="Failing requests before recovery.")
    retry_after: int | None = Field(None, ge=0, description="`Retry-After` sent with failures.")
    expires_in: int = Field(14399, ge=1, description="Lifetime of issued JWTs in seconds.")
    garbage: Garbage | None = Field(None, description="Answer with a broken response.")


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """What the last POST /oauth/token carried; secret field values are SHA-256 digests."""

    fields: dict[str, str]
    content_type: str
    accept: str


class ApiTokenIn(BaseModel):
    api_token: SecretStr = Field(min_length=1, max_length=4096)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _oauth_error(status: int, error: str, description: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=status,
        headers={**_NO_STORE, **headers},
    )


class DevIdm:
    """State and behaviour of one development IdM. Handlers never await between reading and
    writing this state, so plain ints stay exact under concurrent requests on one event loop."""

    def __init__(self) -> None:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public_pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = _digest(public_pem.decode())[:16]
        self._signing_key = jwk.construct(
            private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            algorithm="RS256",
        )
        self._public_jwk = {
            **jwk.construct(public_pem, algorithm="RS256").to_dict(),
            "kid": self.kid,
            "use": "sig",
        }
        self._registered: set[str] = set()
        self._revoked: set[str] = set()
        self.reset()

    # --- control -------------------------------------------------------------------------------

    def register(self, api_token: str) -> None:
        digest = _digest(api_token)
        self._revoked.discard(digest)
        self._registered.add(digest)

    def revoke(self, api_token: str) -> None:
        digest = _digest(api_token)
        self._registered.discard(digest)
        self._revoked.add(digest)

    def set_mode(self, mode: DevIdmMode | None = None, /, **fields: Any) -> DevIdmMode:
        """Replace the whole mode: `set_mode(DevIdmMode(...))` or `set_mode(fail_status=503)`."""
        self._mode = mode if mode is not None else DevIdmMode.model_validate(fields)
        return self._mode

    def reset(self, *, tokens: bool = False) -> None:
        """Counters, mode and the last request; with tokens=True also registrations/revocations."""
        self._mode = DevIdmMode()
        self._requests = 0
        self._exchanges = 0
        self._redirect_target_hits = 0
        self._last_request: RecordedRequest | None = None
        if tokens:
            self._registered.clear()
            self._revoked.clear()

    @property
    def mode(self) -> DevIdmMode:
        return self._mode

    @property
    def requests(self) -> int:
        """Every POST /oauth/token, whatever its outcome."""
        return self._requests

    @property
    def exchanges(self) -> int:
        """Successful token responses (JWTs issued)."""
        return self._exchanges

    @property
    def redirect_target_hits(self) -> int:
        """Requests to where the `redirect` garbage points; a client must never follow it."""
        return self._redirect_target_hits

    @property
    def last_request(self) -> RecordedRequest | None:
        return self._last_request

    def state(self) -> dict[str, Any]:
        last = self._last_request
        return {
            "requests": self._requests,
            "exchanges": self._exchanges,
            "redirect_target_hits": self._redirect_target_hits,
            "mode": self._mode.model_dump(),
            "last_request": asdict(last) if last else None,
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._public_jwk]}

    def accepts(self, api_token: str) -> bool:
        digest = _digest(api_token)
        if digest in self._revoked:
            return False
        return api_token.startswith(ACCEPTED_PREFIX) or digest in self._registered

    # --- the token endpoint --------------------------------------------------------------------

    def answer(
        self, content_type: str, accept: str, body: bytes, *, redirect_url: str
    ) -> tuple[float, Response]:
        """Count, decide and build the response to one POST /oauth/token, without awaiting.

        Returns the delay to apply before sending it: the work happens on arrival, so a client that
        gives up early still leaves exact counters behind.
        """
        self._requests += 1
        mode = self._mode
        delay = mode.delay_ms / 1000
        fields = self._parse_form(content_type, body)
        if fields is not None:
            self._last_request = RecordedRequest(
                {k: _digest(v) if k in _SECRET_FIELDS else v for k, v in fields.items()},
                content_type,
                accept,
            )
        if mode.fail_status is not None or mode.garbage is not None:
            self._spend_failure(mode)
            return delay, self._failure(mode, redirect_url)
        if fields is None:
            return delay, _oauth_error(
                400, "invalid_request", "expected a form body with each parameter at most once"
            )
        problem = self._check_grant(fields)
        if problem is not None:
            return delay, problem
        self._exchanges += 1
        return delay, JSONResponse(
            self._token_body(fields["subject_token"], mode.expires_in), headers=_NO_STORE
        )

    def hit_redirect_target(self) -> None:
        self._redirect_target_hits += 1

    @staticmethod
    def _parse_form(content_type: str, body: bytes) -> dict[str, str] | None:
        """The form fields; None if the body is not a form or repeats a field (RFC 6749 3.2)."""
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            return None
        try:
            parsed = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError):
            return None
        if any(len(values) > 1 for values in parsed.values()):
            return None
        return {name: values[0] for name, values in parsed.items()}

    def _check_grant(self, fields: dict[str, str]) -> JSONResponse | None:
        grant_type = fields.get("grant_type")
        if not grant_type:
            return _oauth_error(400, "invalid_request", "grant_type is required")
        if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
            return _oauth_error(
                400, "unsupported_grant_type", f"only {GRANT_TYPE_TOKEN_EXCHANGE} is supported"
            )
        if not fields.get("subject_token"):
            return _oauth_error(400, "invalid_request", "subject_token is required")
        if fields.get("subject_token_type", TOKEN_TYPE_API_TOKEN) != TOKEN_TYPE_API_TOKEN:
            return _oauth_error(400, "invalid_request", "unsupported subject_token_type")
        if fields.get("requested_token_type", TOKEN_TYPE_ACCESS_TOKEN) != TOKEN_TYPE_ACCESS_TOKEN:
            return _oauth_error(400, "invalid_request", "unsupported requested_token_type")
        if not self.accepts(fields["subject_token"]):
            return _oauth_error(400, "invalid_grant", "the subject token is invalid or revoked")
        return None

    def _token_body(self, api_token: str, expires_in: int) -> dict[str, Any]:
        return {
            "access_token": self._sign(api_token, expires_in),
            "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
            "token_type": "Bearer",
            "expires_in": expires_in,
        }

    def _sign(self, api_token: str, expires_in: int) -> str:
        iat = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": f"dev-{_digest(api_token)[:24]}",
            "iat": iat,
            "exp": iat + expires_in,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._signing_key, algorithm="RS256", headers={"kid": self.kid})

    def _spend_failure(self, mode: DevIdmMode) -> None:
        if mode.fail_times is None:
            return
        if mode.fail_times > 1:
            self._mode = mode.model_copy(update={"fail_times": mode.fail_times - 1})
        else:
            self._mode = mode.model_copy(
                update={
                    "fail_status": None,
                    "fail_times": None,
                    "retry_after": None,
                    "garbage": None,
                }
            )

    def _failure(self, mode: DevIdmMode, redirect_url: str) -> Response:
        headers = {} if mode.retry_after is None else {"Retry-After": str(mode.retry_after)}
        if mode.fail_status is not None:
            status = mode.fail_status
            if status >= 500:
                error = "server_error" if status == 500 else "temporarily_unavailable"
            else:
                error = "temporarily_unavailable" if status == 429 else "invalid_request"
            return _oauth_error(status, error, f"simulated failure ({status})", **headers)
        match mode.garbage:
            case "html":
                page = "<!doctype html><html><body><h1>Sign in</h1></body></html>"
                return HTMLResponse(page, headers=headers)
            case "huge":
                return StreamingResponse(
                    _huge_json(HUGE_BODY_BYTES), media_type="application/json", headers=headers
                )
            case "missing-fields":
                body = {"issued_token_type": TOKEN_TYPE_ACCESS_TOKEN, "token_type": "Bearer"}
                return JSONResponse({**body, "expires_in": mode.expires_in}, headers=headers)
            case "bad-expires":
                body = self._token_body(f"{ACCEPTED_PREFIX}garbage", mode.expires_in)
                return JSONResponse({**body, "expires_in": -5}, headers=headers)
            case "redirect":
                return RedirectResponse(redirect_url, status_code=302, headers=headers)
        raise AssertionError("unreachable: a failure mode without a failure")


def _huge_json(size: int) -> Iterator[bytes]:
    """A valid token response padded past `size` bytes, in chunks, so a reader can stop early."""
    yield b'{"access_token":"x","token_type":"Bearer","expires_in":60,"padding":"'
    chunk = b"x" * 65536
    for _ in range(size // len(chunk) + 1):
        yield chunk
    yield b'"}'


def create_dev_idm_app(idm: DevIdm | None = None) -> FastAPI:
    dev_idm = idm if idm is not None else DevIdm()
    app = FastAPI(
        title="tokenvend development IdM", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.idm = dev_idm
    router = APIRouter()

    @router.post("/oauth/token")
    async def token(request: Request) -> Response:
        body = await request.body()
        delay, response = dev_idm.answer(
            request.headers.get("content-type", ""),
            request.headers.get("accept", ""),
            body,
            redirect_url=str(request.url_for("redirect_target")),
        )
        if delay:
            await asyncio.sleep(delay)
        return response

    @router.api_route("/_dev/redirect-target", methods=["GET", "POST"], name="redirect_target")
    async def redirect_target() -> dict[str, str]:
        dev_idm.hit_redirect_target()
        return {"detail": "a token client must not follow redirects"}

    @router.get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return dev_idm.jwks()

    @router.get("/_dev/state")
    async def state() -> dict[str, Any]:
        return dev_idm.state()

    @router.put("/_dev/mode")
    async def put_mode(mode: DevIdmMode) -> DevIdmMode:
        return dev_idm.set_mode(mode)

    @router.post("/_dev/reset", status_code=204)
    async def reset(tokens: bool = False) -> None:
        dev_idm.reset(tokens=tokens)

    @router.post("/_dev/api-tokens", status_code=204)
    async def register(body: ApiTokenIn) -> None:
        dev_idm.register(body.api_token.get_secret_value())

    @router.post("/_dev/api-tokens/revoke", status_code=204)
    async def revoke(body: ApiTokenIn) -> None:
        dev_idm.revoke(body.api_token.get_secret_value())

    app.include_router(router)
    return app
