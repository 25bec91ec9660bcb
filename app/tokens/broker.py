"""The broker: from a credential to a JWT that lives at least `min_ttl` more seconds.

A hit is one cache read. A miss goes through single flight: one task per credential and version in
this process (every concurrent caller awaits the same task), and across processes a cache lock
(`SET NX PX` with an owner token, compare-and-delete release). Whoever holds the lock reads the
cache again before exchanging, so a replica that lost the race serves the winner's JWT instead of
exchanging a second time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.config import Region
from app.core.crypto import DecryptionFailed, Keyring, Sealed
from app.core.db import utcnow
from app.core.jwt import unverified_expiry
from app.credentials.models import Credential, CredentialStatus
from app.integrations.phrase.client import CredentialRejected, PhraseIdmClient
from app.tokens.cache import CachedJwt, TokenCache
from app.tokens.exceptions import CredentialDisabled, CredentialUnreadable, TokenLifetimeTooShort

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class CredentialSnapshot:
    """What the broker needs of a credential row, detached from any session."""

    id: uuid.UUID
    version: int
    region: Region
    status: CredentialStatus
    last_error_code: str | None
    last_error_at: dt.datetime | None
    sealed_token: Sealed
    aad: bytes

    @classmethod
    def of(cls, cred: Credential) -> CredentialSnapshot:
        return cls(
            id=cred.id,
            version=cred.version,
            region=cred.region,
            status=cred.status,
            last_error_code=cred.last_error_code,
            last_error_at=cred.last_error_at,
            sealed_token=Sealed(cred.api_token_key_id, cred.api_token_ciphertext),
            aad=cred.aad,
        )


@dataclass(frozen=True, slots=True)
class Vended:
    jwt: CachedJwt
    cache: Literal["hit", "miss"]


def expiry_of(access_token: str, requested_at: float, expires_in: int) -> float:
    """`min(request start + expires_in, exp claim)`: the earlier of what the upstream said twice."""
    by_expires_in = requested_at + expires_in
    exp = unverified_expiry(access_token)
    return by_expires_in if exp is None else min(by_expires_in, exp)


def cache_ttl(expires_at: float, margin: float, now: float) -> float:
    """How long a JWT may sit in the cache: until `margin` seconds before it expires, so that
    no reader can ever get it expired. Zero or less means: don't cache it."""
    return expires_at - margin - now


class Broker:
    def __init__(
        self,
        *,
        cache: TokenCache,
        idm: PhraseIdmClient,
        keyring: Keyring,
        sessionmaker: async_sessionmaker[AsyncSession],
        expiry_margin: float,
        lock_ttl: float,
        rejected_retry: float,
    ) -> None:
        self.cache = cache
        self._idm = idm
        self._keyring = keyring
        self._sessionmaker = sessionmaker
        self._margin = expiry_margin
        self._lock_ttl = lock_ttl
        self._rejected_retry = rejected_retry
        self._inflight: dict[tuple[uuid.UUID, int], asyncio.Task[CachedJwt]] = {}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def vend(self, cred: CredentialSnapshot, min_ttl: float) -> Vended:
        if cred.status is CredentialStatus.DISABLED:
            raise CredentialDisabled("the credential is disabled by an admin")
        if cred.status is CredentialStatus.REJECTED and self._recently_rejected(cred):
            # Negative cache: the upstream refused this API token moments ago; asking again
            # only burns its rate limit until an admin rotates the token.
            raise CredentialRejected(upstream_error=cred.last_error_code or "unknown")
        jwt = await self.cache.get(cred.id, cred.version)
        if jwt is not None and jwt.remaining() >= min_ttl:
            return Vended(jwt, "hit")
        jwt = await self._single_flight(cred, min_ttl)
        if jwt.remaining() < min_ttl:
            # The flight we joined settled for a shorter-lived JWT than this caller needs.
            jwt = await self._single_flight(cred, min_ttl)
        if jwt.remaining() < min_ttl:
            raise TokenLifetimeTooShort(
                f"the upstream issued a JWT living {max(jwt.remaining(), 0):.0f} s, "
                f"less than the requested min_ttl of {min_ttl:.0f} s"
            )
        return Vended(jwt, "miss")

    async def purge(self, cred_id: uuid.UUID, version: int) -> None:
        await self.cache.purge(cred_id, version)

    def _recently_rejected(self, cred: CredentialSnapshot) -> bool:
        if cred.last_error_at is None:
            return False
        return (utcnow() - cred.last_error_at).total_seconds() < self._rejected_retry

    async def _single_flight(self, cred: CredentialSnapshot, min_ttl: float) -> CachedJwt:
        key = (cred.id, cred.version)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(cred, min_ttl), name=f"exchange-{cred.id}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        # Shielded: a caller that gives up (client gone, deadline) must not cancel the exchange
        # the other callers are waiting for.
        return await asyncio.shield(task)

    def _forget(self, key: tuple[uuid.UUID, int], task: asyncio.Task[CachedJwt]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, so a failure nobody awaited is not reported as lost

    async def _refresh(self, cred: CredentialSnapshot, min_ttl: float) -> CachedJwt:
        owner = await self._acquire(cred, min_ttl)
        if isinstance(owner, CachedJwt):
            return owner
        try:
            jwt = await self.cache.get(cred.id, cred.version)
            if jwt is not None and jwt.remaining() >= min_ttl:
                return jwt  # another replica exchanged while we waited for the lock
            return await self._exchange(cred)
        finally:
            await self.cache.unlock(cred.id, owner)

    async def _acquire(self, cred: CredentialSnapshot, min_ttl: float) -> str | CachedJwt:
        """The lock's owner token, or the JWT another replica stored while we waited."""
        while (owner := await self.cache.try_lock(cred.id, self._lock_ttl)) is None:
            # Another replica is exchanging. Its lock expires after lock_ttl even if it dies,
            # so this loop ends.
            await asyncio.sleep(LOCK_POLL_SECONDS)
            jwt = await self.cache.get(cred.id, cred.version)
            if jwt is not None and jwt.remaining() >= min_ttl:
                return jwt
        return owner

    async def _exchange(self, cred: CredentialSnapshot) -> CachedJwt:
        try:
            api_token = self._keyring.open(cred.sealed_token, cred.aad).decode()
        except DecryptionFailed:
            log.error("credential.decrypt.failed credential_id=%s", cred.id)
            raise CredentialUnreadable("the stored API token cannot be decrypted") from None
        try:
            exchanged = await self._idm.exchange(cred.region, api_token)
        except CredentialRejected as exc:
            await self._record(cred, rejected=exc.upstream_error)
            raise
        jwt = CachedJwt(
            exchanged.access_token,
            expiry_of(exchanged.access_token, exchanged.requested_at, exchanged.expires_in),
        )
        await self.cache.put(
            cred.id, cred.version, jwt, jwt.expires_at - self._margin - time.time()
        )
        await self._record(cred, rejected=None)
        return jwt

    async def _record(self, cred: CredentialSnapshot, *, rejected: str | None) -> None:
        """Note the exchange's outcome on the row. Best effort: the JWT matters more."""
        now = utcnow()
        if rejected is not None:
            values: dict[str, object] = {
                "status": CredentialStatus.REJECTED,
                "last_error_code": rejected,
                "last_error_at": now,
            }
        else:
            values = {"last_exchange_at": now}
            if cred.status is CredentialStatus.REJECTED:
                values |= {"status": CredentialStatus.ACTIVE}
        try:
            async with self._sessionmaker() as session, session.begin():
                await session.execute(
                    update(Credential)
                    .where(Credential.id == cred.id, Credential.version == cred.version)
                    .where(Credential.status != CredentialStatus.DISABLED)
                    .values(values)
                )
        except SQLAlchemyError:
            log.warning("credential.status.write_failed credential_id=%s", cred.id)
