from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from app.audit import service as audit
from app.audit.dependencies import request_record
from app.auth.dependencies import Admin, CurrentClient, client_for_key, ensure_team_access
from app.auth.service import Principal
from app.core.deps import InfraDep, SessionDep
from app.core.lifespan import Infra
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import SLUG_PATTERN
from app.credentials.service import evict_jwt, find_for_vend
from app.teams.router import TeamSlug
from app.tokens.schemas import ISSUED_TOKEN_TYPE, NO_STORE, EvictResponse, TokenResponse
from app.tokens.service import vend_for

router = APIRouter(prefix="/v1/teams/{team}/token", tags=["tokens"])

CredentialParam = Annotated[
    str,
    Query(
        pattern=SLUG_PATTERN, max_length=63, description="Credential name.", examples=["default"]
    ),
]
_NO_STORE_RAW = [(k.lower().encode(), v.encode()) for k, v in NO_STORE.items()]

# What the declared parameters accept, for the fast path below (anything else is not fast).
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_MIN_TTL = 3600
_QUERY = frozenset({"credential", "min_ttl", "rejected_sha256"})


@dataclass(frozen=True, slots=True)
class _Vend:
    key: str = field(repr=False)  # the client's secret: never in a repr
    team: str
    credential: str
    min_ttl: int | None
    rejected_sha256: str | None


def _well_formed(request: Request) -> _Vend | None:
    """The request's bearer key and parameters, if all are present where needed and valid by the
    declaration of `get_token`; None for anything else, however harmless."""
    scope = request.scope
    key = None
    for name, value in scope["headers"]:
        if name == b"authorization":  # the first one, as Starlette's `headers.get` takes it
            scheme, _, param = value.decode("latin-1").partition(" ")
            key = param.strip() if scheme.lower() == "bearer" else None
            break
    team = scope["path_params"].get("team", "")
    if not key or not _SLUG.fullmatch(team):
        return None
    query: dict[str, str] = {}
    if scope["query_string"]:
        for name, value in parse_qsl(scope["query_string"].decode("latin-1"), True):
            if name in _QUERY:
                if name in query:
                    return None
                query[name] = value
    credential = query.get("credential", "default")
    ttl = query.get("min_ttl")
    rejected = query.get("rejected_sha256")
    if not _SLUG.fullmatch(credential):
        return None
    if ttl is not None and not (ttl.isascii() and ttl.isdigit() and int(ttl) <= _MAX_MIN_TTL):
        return None
    if rejected is not None and not _SHA256.fullmatch(rejected):
        return None
    return _Vend(key, team, credential, None if ttl is None else int(ttl), rejected)


class VendRoute(APIRoute):
    """The token route without FastAPI's per-request dependency solving, its hot path.

    A well-formed request (a bearer key, a valid team and valid parameters: nearly all traffic)
    is parsed by `_well_formed` and runs what the declared endpoint runs: `client_for_key`, the
    grant check, `_vend`. Everything else goes to the handler FastAPI builds from the declaration,
    so every refusal of bad input, the OpenAPI document and the contract tests stay FastAPI's.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        declared = super().get_route_handler()

        async def handler(request: Request) -> Response:
            wanted = _well_formed(request)
            if wanted is None:
                return await declared(request)
            infra: Infra = request.app.state.infra
            client = await client_for_key(request, infra, wanted.key)
            return await _vend(
                request,
                infra,
                client,
                wanted.team,
                wanted.credential,
                wanted.min_ttl,
                wanted.rejected_sha256,
            )

        return handler


router = APIRouter(prefix="/v1/teams/{team}/token", tags=["tokens"])


async def get_token(
    request: Request,
    team: TeamSlug,
    client: CurrentClient,
    infra: InfraDep,
    credential: CredentialParam = "default",
    min_ttl: Annotated[
        int | None,
        Query(
            ge=0,
            le=_MAX_MIN_TTL,
            description="Minimum remaining lifetime in seconds (default from settings).",
        ),
    ] = None,
    rejected_sha256: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9a-fA-F]{64}$",
            description="SHA-256 (hex) of a JWT that Phrase refused: a new JWT is exchanged only "
            "if the cached one has this hash, so many callers reporting it cause one exchange.",
        ),
    ] = None,
) -> Response:
    """A JWT for the team's credential with at least `min_ttl` seconds to live: from the cache when
    one is there, otherwise exchanged at the Phrase IdM (one exchange however many ask at once)."""
    return await _vend(request, infra, client, team, credential, min_ttl, rejected_sha256)


router.add_api_route(
    "",
    get_token,
    methods=["GET"],
    response_model=TokenResponse,
    operation_id="getToken",
    summary="Get a team's Phrase JWT",
    responses={
        200: {
            "headers": {"Cache-Control": {"schema": {"type": "string"}, "description": "no-store"}}
        },
        **responses(*AUTHENTICATED, 404, 409, 424, 502, 504),
    },
    route_class_override=VendRoute,
)


async def _vend(
    request: Request,
    infra: Infra,
    client: Principal,
    team: str,
    credential: str,
    min_ttl: int | None,
    rejected_sha256: str | None,
) -> Response:
    ensure_team_access(request, client, team, infra.audit)
    cred, vended = await vend_for(
        request, infra, team, credential, min_ttl, rejected_sha256=rejected_sha256
    )
    jwt = vended.jwt
    body = {
        "access_token": jwt.access_token,
        "token_type": "Bearer",
        "issued_token_type": ISSUED_TOKEN_TYPE,
        "expires_in": max(0, math.floor(jwt.remaining())),
        "expires_at": dt.datetime.fromtimestamp(int(jwt.expires_at), dt.UTC),
        "team": team,
        "credential": credential,
        "region": cred.region,
        "cache": vended.cache,
    }
    response = Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json")
    response.raw_headers.extend(_NO_STORE_RAW)
    return response


@router.delete(
    "",
    response_model=EvictResponse,
    operation_id="evictToken",
    summary="Evict a cached JWT",
    responses=responses(*AUTHENTICATED, 404),
)
async def evict_token(
    request: Request,
    team: TeamSlug,
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
    credential: CredentialParam = "default",
) -> EvictResponse:
    """Drop the cached JWT so the next request exchanges anew."""
    cred = await find_for_vend(session, team, credential)
    evicted = await evict_jwt(cred, infra.cache)
    audit.add(
        session,
        request_record(
            request, "token.evict", team=team, credential=credential, details={"evicted": evicted}
        ),
    )
    return EvictResponse(team=team, credential=credential, evicted=evicted)
