from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.credentials.models import Credential
from app.teams.exceptions import TeamExists, TeamNotFound
from app.teams.models import Team
from app.teams.schemas import TeamCreate, TeamUpdate
from app.tokens.cache import TokenCache


async def create_team(session: AsyncSession, data: TeamCreate) -> Team:
    team = Team(slug=data.slug, name=data.name or data.slug)
    try:
        async with session.begin_nested():
            session.add(team)
    except IntegrityError:
        raise TeamExists(f"a team with slug {data.slug!r} exists") from None
    return team


async def get_team(session: AsyncSession, slug: str) -> Team:
    team = await session.scalar(select(Team).where(Team.slug == slug))
    if team is None:
        raise TeamNotFound(f"no team {slug!r}")
    return team


async def list_teams(session: AsyncSession, *, limit: int, offset: int) -> Sequence[Team]:
    query = select(Team).order_by(Team.slug).limit(limit).offset(offset)
    return (await session.scalars(query)).all()


async def update_team(session: AsyncSession, team: Team, data: TeamUpdate) -> Team:
    for field, value in data.model_dump(exclude_unset=True).items():
        setattr(team, field, value)
    await session.flush()
    return team


async def delete_team(session: AsyncSession, team: Team, cache: TokenCache) -> None:
    """Delete the team; its credentials go with it (ON DELETE CASCADE) and so do their JWTs."""
    creds = (await session.scalars(select(Credential).where(Credential.team_id == team.id))).all()
    await session.delete(team)
    await session.flush()
    for cred in creds:
        await cache.purge(cred.id, cred.version)
