from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from app.audit import service as audit
from app.audit.dependencies import request_record
from app.auth.dependencies import Admin
from app.core.deps import InfraDep, PagingDep, SessionDep
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import SLUG_PATTERN, Page
from app.teams import service
from app.teams.schemas import TeamCreate, TeamRead, TeamUpdate

router = APIRouter(prefix="/v1/teams", tags=["teams"], responses=responses(*AUTHENTICATED))

TeamSlug = Annotated[str, Path(pattern=SLUG_PATTERN, max_length=63, examples=["acme"])]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeamRead,
    operation_id="createTeam",
    summary="Create a team",
    responses=responses(409),
)
async def create_team(
    request: Request, data: TeamCreate, _admin: Admin, session: SessionDep
) -> TeamRead:
    """Create a team. Its slug names it in every URL and in client grants."""
    team = await service.create_team(session, data)
    audit.add(session, request_record(request, "team.create", team=team.slug))
    return TeamRead.model_validate(team)


@router.get("", response_model=Page[TeamRead], operation_id="listTeams", summary="List teams")
async def list_teams(_admin: Admin, session: SessionDep, paging: PagingDep) -> Page[TeamRead]:
    """Teams ordered by slug."""
    teams = await service.list_teams(session, limit=paging.limit + 1, offset=paging.offset)
    return Page.of(
        [TeamRead.model_validate(t) for t in teams], limit=paging.limit, offset=paging.offset
    )


@router.get(
    "/{team}",
    response_model=TeamRead,
    operation_id="getTeam",
    summary="Get a team",
    responses=responses(404),
)
async def get_team(team: TeamSlug, _admin: Admin, session: SessionDep) -> TeamRead:
    """One team by its slug."""
    return TeamRead.model_validate(await service.get_team(session, team))


@router.patch(
    "/{team}",
    response_model=TeamRead,
    operation_id="updateTeam",
    summary="Rename a team",
    responses=responses(404),
)
async def update_team(
    request: Request, team: TeamSlug, data: TeamUpdate, _admin: Admin, session: SessionDep
) -> TeamRead:
    """Change a team's display name; the slug is its identity and does not change."""
    found = await service.update_team(session, await service.get_team(session, team), data)
    audit.add(session, request_record(request, "team.update", team=team))
    return TeamRead.model_validate(found)


@router.delete(
    "/{team}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteTeam",
    summary="Delete a team",
    responses=responses(404),
)
async def delete_team(
    request: Request, team: TeamSlug, _admin: Admin, session: SessionDep, infra: InfraDep
) -> None:
    """Delete the team with its credentials, and purge their cached JWTs."""
    await service.delete_team(session, await service.get_team(session, team), infra.cache)
    audit.add(session, request_record(request, "team.delete", team=team))
