"""Authenticating client keys, from process memory when current (see `app.core.localcache`).

A key is looked up by its key id and its digest compared in constant time. Successful lookups are
cached under the key's digest, so a cached entry can only be found by presenting the exact key;
disabling, deleting or rotating the client flushes every replica's cache after the commit.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.auth import keys
from app.clients.models import ALL_TEAMS, Client, Role
from app.clients.service import find_by_key_id
from app.core.db import utcnow
from app.core.localcache import Coalescer, Invalidation, LocalCache

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, detached from any database session."""

    id: uuid.UUID
    name: str
    role: Role
    teams: frozenset[str]
    rate_limit_per_second: float | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may_access(self, team: str) -> bool:
        return self.role is Role.ADMIN or ALL_TEAMS in self.teams or team in self.teams


class Authenticator:
    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        invalidation: Invalidation,
        *,
        max_age: float = 300.0,
        max_entries: int = 10_000,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._inv = invalidation
        self._cache: LocalCache[str, Principal] = LocalCache(
            invalidation, max_age=max_age, max_entries=max_entries
        )
        self._loads: Coalescer[tuple[str, int], Principal | None] = Coalescer()

    async def authenticate(self, key: str, *, optimistic: bool = False) -> Principal | None:
        """The key's principal, or None. `optimistic` may answer from process memory before the
        request has checked the cache generation; the caller then calls `confirm`."""
        key_id = keys.parse_key_id(key)
        if key_id is None:
            return None
        digest = keys.digest(key)
        principal = self._cache.get(digest, verified=not optimistic)
        if principal is not None:
            return principal
        # Keyed by epoch too: a request after a flush must not join a load begun before it.
        return await self._loads.load(
            (digest, self._inv.epoch), lambda: self._load(key, key_id, digest)
        )

    async def _load(self, key: str, key_id: str, digest: str) -> Principal | None:
        epoch = self._inv.epoch
        async with self._sessionmaker() as session, session.begin():
            client = await find_by_key_id(session, key_id)
            if client is None or client.disabled or not keys.verify(key, client.key_digest):
                return None
            now = utcnow()
            if client.last_used_at is None or now - client.last_used_at > LAST_USED_RESOLUTION:
                # Coarse (at most once a minute per replica), and usage rather than a change: an
                # UPDATE that names `updated_at` keeps the model's `onupdate` from moving it.
                await session.execute(
                    update(Client)
                    .where(Client.id == client.id)
                    .values(last_used_at=now, updated_at=Client.updated_at)
                )
            principal = Principal(
                client.id,
                client.name,
                client.role,
                frozenset(client.teams),
                client.rate_limit_per_second,
            )
        self._cache.put(digest, principal, epoch)
        return principal
