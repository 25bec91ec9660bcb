from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Request, status

from app.audit import service as audit
from app.audit.dependencies import request_record
from app.auth.dependencies import Admin
from app.core.deps import InfraDep, PagingDep, SessionDep
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import SLUG_PATTERN, Page
from app.credentials import service
from app.credentials.models import CredentialStatus
from app.credentials.schemas import (
    ApiTokenRotate,
    CredentialCreate,
    CredentialRead,
    CredentialUpdate,
)
from app.teams.router import TeamSlug
from app.teams.service import get_team
from app.tokens.broker import CredentialSnapshot

router = APIRouter(
    prefix="/v1/teams/{team}/credentials",
    tags=["credentials"],
    responses=responses(*AUTHENTICATED, 404),
)

CredentialName = Annotated[str, Path(pattern=SLUG_PATTERN, max_length=63, examples=["default"])]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=CredentialRead,
    operation_id="createCredential",
    summary="Store a Phrase API token",
    responses=responses(409),
)
async def create_credential(
    request: Request,
    team: TeamSlug,
    data: CredentialCreate,
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
) -> CredentialRead:
    """Store a team's Phrase Platform API token, encrypted. The token is never returned."""
    found = await get_team(session, team)
    cred = await service.create_credential(session, found, data, infra.settings.keyring)
    audit.add(
        session,
        request_record(
            request,
            "credential.create",
            team=team,
            credential=cred.name,
            details={"region": cred.region},
        ),
    )
    return await service.read_view(cred, team, infra.cache)


@router.get(
    "",
    response_model=Page[CredentialRead],
    operation_id="listCredentials",
    summary="List a team's credentials",
)
async def list_credentials(
    team: TeamSlug, _admin: Admin, session: SessionDep, infra: InfraDep, paging: PagingDep
) -> Page[CredentialRead]:
    """A team's credentials by name, each with its status and cached-JWT expiry."""
    found = await get_team(session, team)
    creds = await service.list_credentials(
        session, found, limit=paging.limit + 1, offset=paging.offset
    )
    views = [await service.read_view(c, team, infra.cache) for c in creds]
    return Page.of(views, limit=paging.limit, offset=paging.offset)


@router.get(
    "/{name}",
    response_model=CredentialRead,
    operation_id="getCredential",
    summary="Get a credential's status",
)
async def get_credential(
    team: TeamSlug, name: CredentialName, _admin: Admin, session: SessionDep, infra: InfraDep
) -> CredentialRead:
    """Status, last exchange, last error, and whether a JWT is cached and until when."""
    cred = await service.get_credential(session, await get_team(session, team), name)
    return await service.read_view(cred, team, infra.cache)


@router.patch(
    "/{name}",
    response_model=CredentialRead,
    operation_id="updateCredential",
    summary="Disable, enable or relabel a credential",
)
async def update_credential(
    request: Request,
    team: TeamSlug,
    name: CredentialName,
    data: CredentialUpdate,
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
) -> CredentialRead:
    """`status: disabled` stops vending at once (cached JWTs are no longer handed out);
    `status: active` re-enables and clears a rejection. Also sets the product label and the API
    token's expiry date."""
    cred = await service.get_credential(session, await get_team(session, team), name)
    cred = await service.update_credential(session, cred, data)
    details = data.model_dump(mode="json", exclude_unset=True)
    audit.add(
        session,
        request_record(request, "credential.update", team=team, credential=name, details=details),
    )
    return await service.read_view(cred, team, infra.cache)


@router.put(
    "/{name}/api-token",
    response_model=CredentialRead,
    operation_id="rotateApiToken",
    summary="Rotate the Phrase API token",
)
async def rotate_api_token(
    request: Request,
    team: TeamSlug,
    name: CredentialName,
    data: ApiTokenRotate,
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
    background: BackgroundTasks,
) -> CredentialRead:
    """Replace the API token: new ciphertext, version bump, cached JWT purged, status active."""
    cred = await service.get_credential(session, await get_team(session, team), name)
    was_rejected = cred.status is CredentialStatus.REJECTED
    cred = await service.rotate_api_token(session, cred, data, infra.settings.keyring, infra.cache)
    if was_rejected:
        # Reported once the response is on its way, so after the transaction committed.
        background.add_task(infra.broker.report_recovered, CredentialSnapshot.of(cred, team))
    audit.add(
        session,
        request_record(
            request,
            "credential.rotate",
            team=team,
            credential=name,
            details={"version": cred.version},
        ),
    )
    return await service.read_view(cred, team, infra.cache)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteCredential",
    summary="Delete a credential",
)
async def delete_credential(
    request: Request,
    team: TeamSlug,
    name: CredentialName,
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
) -> None:
    """Delete the credential and its sealed API token, and purge its cached JWT."""
    cred = await service.get_credential(session, await get_team(session, team), name)
    await service.delete_credential(session, cred, infra.cache)
    audit.add(session, request_record(request, "credential.delete", team=team, credential=name))
