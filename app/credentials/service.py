"""Credentials: a team's Phrase API tokens, sealed before they touch the database."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.crypto import Keyring
from app.credentials.exceptions import CredentialExists, CredentialNotFound
from app.credentials.models import Credential, CredentialStatus
from app.credentials.schemas import (
    ApiTokenRotate,
    CredentialCreate,
    CredentialRead,
    CredentialUpdate,
    LastError,
)
from app.teams.exceptions import TeamNotFound
from app.teams.models import Team
from app.tokens.cache import TokenCache


def _seal_into(cred: Credential, api_token: str, keyring: Keyring) -> None:
    sealed = keyring.seal(api_token.encode(), cred.aad)
    cred.api_token_ciphertext = sealed.blob
    cred.api_token_key_id = sealed.key_id
    cred.api_token_hint = api_token[-4:]


async def create_credential(
    session: AsyncSession, team: Team, data: CredentialCreate, keyring: Keyring
) -> Credential:
    cred = Credential(
        id=uuid.uuid4(),
        team_id=team.id,
        name=data.name,
        region=data.region,
        product=data.product,
        expires_on=data.expires_on,
        status=CredentialStatus.ACTIVE,
        version=1,
    )
    _seal_into(cred, data.api_token.get_secret_value(), keyring)
    try:
        async with session.begin_nested():
            session.add(cred)
    except IntegrityError:
        raise CredentialExists(f"team {team.slug!r} has a credential {data.name!r}") from None
    return cred


async def get_credential(session: AsyncSession, team: Team, name: str) -> Credential:
    cred = await session.scalar(
        select(Credential).where(Credential.team_id == team.id, Credential.name == name)
    )
    if cred is None:
        raise CredentialNotFound(f"team {team.slug!r} has no credential {name!r}")
    return cred


async def find_many_for_vend(
    session: AsyncSession, wanted: Collection[tuple[str, str]]
) -> dict[tuple[str, str], Credential | TeamNotFound | CredentialNotFound]:
    """One query from (team slug, credential name) pairs to their rows, or to why there is none."""
    slugs = {slug for slug, _ in wanted}
    names = {name for _, name in wanted}
    rows = await session.execute(
        select(Team.slug, Credential)
        .outerjoin(Credential, (Credential.team_id == Team.id) & Credential.name.in_(names))
        .where(Team.slug.in_(slugs))
    )
    teams: set[str] = set()
    found: dict[tuple[str, str], Credential] = {}
    for slug, cred in rows:
        teams.add(slug)
        if cred is not None:
            found[(slug, cred.name)] = cred
    out: dict[tuple[str, str], Credential | TeamNotFound | CredentialNotFound] = {}
    for slug, name in wanted:
        if (slug, name) in found:
            out[(slug, name)] = found[(slug, name)]
        elif slug not in teams:
            out[(slug, name)] = TeamNotFound(f"no team {slug!r}")
        else:
            out[(slug, name)] = CredentialNotFound(f"team {slug!r} has no credential {name!r}")
    return out


async def find_for_vend(session: AsyncSession, team_slug: str, name: str) -> Credential:
    """One query from (team slug, credential name) to the row; the team must exist."""
    found = (await find_many_for_vend(session, [(team_slug, name)]))[(team_slug, name)]
    if isinstance(found, Exception):
        raise found
    return found


async def list_credentials(
    session: AsyncSession, team: Team, *, limit: int, offset: int
) -> Sequence[Credential]:
    query = (
        select(Credential)
        .where(Credential.team_id == team.id)
        .order_by(Credential.name)
        .limit(limit)
        .offset(offset)
    )
    return (await session.scalars(query)).all()


async def update_credential(
    session: AsyncSession, cred: Credential, data: CredentialUpdate
) -> Credential:
    changes = data.model_dump(exclude_unset=True)
    status = changes.pop("status", None)
    for field, value in changes.items():
        setattr(cred, field, value)
    if status is not None:
        cred.status = CredentialStatus(status)
        cred.last_error_code = cred.last_error_at = None
    await session.flush()
    return cred


async def rotate_api_token(
    session: AsyncSession,
    cred: Credential,
    data: ApiTokenRotate,
    keyring: Keyring,
    cache: TokenCache,
) -> Credential:
    """New ciphertext and a version bump: every JWT of the old version is orphaned and purged."""
    old_version = cred.version
    _seal_into(cred, data.api_token.get_secret_value(), keyring)
    cred.version = old_version + 1
    if "expires_on" in data.model_fields_set:
        cred.expires_on = data.expires_on
    if cred.status is CredentialStatus.REJECTED:
        cred.status = CredentialStatus.ACTIVE
    cred.last_error_code = cred.last_error_at = None
    await session.flush()
    await cache.purge(cred.id, old_version)
    return cred


async def delete_credential(session: AsyncSession, cred: Credential, cache: TokenCache) -> None:
    await session.delete(cred)
    await session.flush()
    await cache.purge(cred.id, cred.version)


async def evict_jwt(cred: Credential, cache: TokenCache) -> bool:
    """Drop the cached JWT; True if one was cached."""
    cached = await cache.expires_at(cred.id, cred.version) is not None
    await cache.purge(cred.id, cred.version)
    return cached


async def read_view(cred: Credential, team_slug: str, cache: TokenCache) -> CredentialRead:
    expires_at = await cache.expires_at(cred.id, cred.version)
    last_error = (
        LastError(code=cred.last_error_code, at=cred.last_error_at)
        if cred.last_error_code and cred.last_error_at
        else None
    )
    return CredentialRead(
        team=team_slug,
        name=cred.name,
        region=cred.region,
        product=cred.product,
        api_token_hint=cred.api_token_hint,
        status=cred.status,
        version=cred.version,
        last_exchange_at=cred.last_exchange_at,
        last_error=last_error,
        expires_on=cred.expires_on,
        jwt_cached=expires_at is not None,
        jwt_expires_at=None
        if expires_at is None
        else dt.datetime.fromtimestamp(expires_at, dt.UTC),
        created_at=cred.created_at,
        updated_at=cred.updated_at,
    )
