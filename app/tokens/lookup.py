"""From (team slug, credential name) to a credential snapshot, from process memory when trusted.

The snapshot carries the credential's version, so a rotation (which flushes every replica's
in-process caches after it commits) is seen on the next request; see `app.core.localcache`.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.localcache import Coalescer, Invalidation, LocalCache
from app.credentials.models import Credential
from app.credentials.service import find_for_vend
from app.teams.models import Team
from app.tokens.broker import CredentialSnapshot


class CredentialDirectory:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        invalidation: Invalidation,
        *,
        max_age: float = 300.0,
        max_entries: int = 100_000,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._inv = invalidation
        self._cache: LocalCache[tuple[str, str], CredentialSnapshot] = LocalCache(
            invalidation, max_age=max_age, max_entries=max_entries
        )
        self._loads: Coalescer[tuple[str, str, int], CredentialSnapshot] = Coalescer()

    async def find(self, team: str, name: str) -> CredentialSnapshot:
        snapshot = self._cache.get((team, name))
        if snapshot is not None:
            return snapshot
        # Keyed by epoch too: a request after a flush must not join a load begun before it.
        return await self._loads.load((team, name, self._inv.epoch), lambda: self._load(team, name))

    async def _load(self, team: str, name: str) -> CredentialSnapshot:
        epoch = self._inv.epoch
        # A short transaction of its own: no pooled connection is held during an exchange.
        async with self._sessionmaker() as session:
            cred = await find_for_vend(session, team, name)
        snapshot = CredentialSnapshot.of(cred, team)
        self._cache.put((team, name), snapshot, epoch)
        return snapshot

    async def by_id(self, cred_id: uuid.UUID) -> CredentialSnapshot | None:
        async with self._sessionmaker() as session:
            row = (
                await session.execute(
                    select(Credential, Team.slug)
                    .join(Team, Team.id == Credential.team_id)
                    .where(Credential.id == cred_id)
                )
            ).first()
        return None if row is None else CredentialSnapshot.of(row[0], row[1])
