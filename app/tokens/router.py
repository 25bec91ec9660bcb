from __future__ import annotations

import datetime as dt
import math
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.audit import service as audit
from app.audit.dependencies import request_record
from app.auth.dependencies import Admin, CurrentClient, ensure_team_access
from app.core.deps import InfraDep, SessionDep
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import SLUG_PATTERN
from app.credentials.service import evict_jwt, find_for_vend
from app.teams.router import TeamSlug
from app.tokens.schemas import ISSUED_TOKEN_TYPE, EvictResponse, TokenResponse
from app.tokens.service import vend_for

router = APIRouter(prefix="/v1/teams/{team}/token", tags=["tokens"])

CredentialParam = Annotated[
    str,
    Query(
        pattern=SLUG_PATTERN, max_length=63, description="Credential name.", examples=["default"]
    ),
]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@router.get(
    "",
    response_model=TokenResponse,
    operation_id="getToken",
    summary="Get a team's Phrase JWT",
    responses={
        200: {
            "headers": {"Cache-Control": {"schema": {"type": "string"}, "description": "no-store"}}
        },
        **responses(*AUTHENTICATED, 404, 409, 424, 502, 504),
    },
)
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
            le=3600,
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
    return Response(
        orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json", headers=NO_STORE
    )


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
