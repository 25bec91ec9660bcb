"""From (team slug, credential name) to a credential snapshot, from process memory when trusted.

The snapshot carries the credential's version, so a rotation (which flushes every replica's
in-process caches after it commits) is seen on the next request; see `app.core.localcache`.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.localcache import Batcher, Invalidation, LocalCache
from app.credentials.models import Credential
from app.credentials.service import find_many_for_vend
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
        self._loads: Batcher[tuple[str, str, int], CredentialSnapshot] = Batcher(self._load)

    async def find(self, team: str, name: str) -> CredentialSnapshot:
        snapshot = self._cache.get((team, name))
        if snapshot is not None:
            return snapshot
        # Keyed by epoch too: a request after a flush must not join a load begun before it.
        return await self._loads.load((team, name, self._inv.epoch))

    async def _load(
        self, keys: list[tuple[str, str, int]]
    ) -> dict[tuple[str, str, int], CredentialSnapshot | Exception]:
        """One short transaction for every credential asked for meanwhile (a cold burst's
        hundred credentials), holding no pooled connection during an exchange."""
        epoch = self._inv.epoch
        async with self._sessionmaker() as session:
            found = await find_many_for_vend(session, {(team, name) for team, name, _ in keys})
        out: dict[tuple[str, str, int], CredentialSnapshot | Exception] = {}
        for key in keys:
            team, name, _ = key
            cred = found[(team, name)]
            if isinstance(cred, Exception):
                out[key] = cred
                continue
            snapshot = out[key] = CredentialSnapshot.of(cred, team)
            self._cache.put((team, name), snapshot, epoch)
        return out

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
