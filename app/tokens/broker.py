"""The broker: from a credential to a JWT that lives at least `min_ttl` more seconds.

A hit is a read of process memory (L1) or, after a flush, of Redis. A miss goes through single
flight: one task per credential and version in this process (every concurrent caller awaits the
same task), and across processes a cache lock (`SET NX PX` with an owner token, compare-and-delete
release). Whoever holds the lock reads the cache again before exchanging, so a replica that lost
the race serves the winner's JWT instead of exchanging a second time.

Around the exchange: a per-region circuit breaker, bounded retries with exponential backoff and
full jitter inside the caller's deadline (a capped `Retry-After` wins over the backoff), and a
negative cache for API tokens the IdM rejected. An upstream failure never turns a cached JWT that
still meets `min_ttl` into an error: such a JWT is served before the upstream is asked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

from sqlalchemy import Table, tuple_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.config import Region
from app.core.crypto import DecryptionFailed, Keyring, Sealed
from app.core.db import utcnow
from app.core.jwt import unverified_expiry
from app.core.localcache import Batcher
from app.credentials.models import Credential, CredentialStatus
from app.integrations.phrase.client import (
    CredentialRejected,
    PhraseIdmClient,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metrics.registry import (
    CREDENTIALS_REJECTED,
    EXCHANGE_DURATION,
    EXCHANGES,
    SINGLE_FLIGHT_WAITS,
)
from app.tokens.cache import LOCAL_OWNER, CachedJwt, TieredCache
from app.tokens.circuit import CircuitBreaker, CircuitState
from app.tokens.exceptions import CredentialDisabled, CredentialUnreadable, TokenLifetimeTooShort

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class CredentialSnapshot:
    """What the broker needs of a credential row, detached from any session."""

    id: uuid.UUID
    team: str
    name: str
    version: int
    region: Region
    status: CredentialStatus
    last_error_code: str | None
    last_error_at: dt.datetime | None
    sealed_token: Sealed
    aad: bytes

    @classmethod
    def of(cls, cred: Credential, team: str) -> CredentialSnapshot:
        return cls(
            id=cred.id,
            team=team,
            name=cred.name,
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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int
    backoff_base: float
    backoff_max: float
    retry_after_cap: float

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        # Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))


def expiry_of(access_token: str, requested_at: float, expires_in: int) -> float:
    """`min(request start + expires_in, exp claim)`: the earlier of what the upstream said twice."""
    by_expires_in = requested_at + expires_in
    exp = unverified_expiry(access_token)
    return by_expires_in if exp is None else min(by_expires_in, exp)


def cache_ttl(expires_at: float, margin: float, now: float) -> float:
    """How long a JWT may sit in the cache: until `margin` seconds before it expires, so that
    no reader can ever get it expired. Zero or less means: don't cache it."""
    return expires_at - margin - now


def jwt_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Decides, once the lock is held and the cache re-read, whether the cached JWT will do.
Acceptable = Callable[[CachedJwt], bool]


class Broker:
    def __init__(
        self,
        *,
        cache: TieredCache,
        idm: PhraseIdmClient,
        breaker: CircuitBreaker,
        keyring: Keyring,
        sessionmaker: async_sessionmaker[AsyncSession],
        expiry_margin: float,
        lock_ttl: float,
        rejected_retry: float,
        deadline: float,
        retry: RetryPolicy,
        refresh_fraction: float,
        refresh_jitter: float,
        on_status_change: Callable[[CredentialSnapshot, str, str | None], None] | None = None,
    ) -> None:
        self.cache = cache
        self._idm = idm
        self._breaker = breaker
        self._keyring = keyring
        self._sessionmaker = sessionmaker
        self._margin = expiry_margin
        self._lock_ttl = lock_ttl
        self._rejected_retry = rejected_retry
        self._deadline = deadline
        self._retry = retry
        self._refresh_fraction = refresh_fraction
        self._refresh_jitter = refresh_jitter
        self._on_status_change = on_status_change
        self._inflight: dict[tuple[uuid.UUID, int], asyncio.Task[CachedJwt]] = {}
        # Keyed by exchange, not by credential: two exchanges of one credential waiting in one
        # batch must not both report its recovery.
        self._exchanged: Batcher[tuple[uuid.UUID, int, int], bool] = Batcher(self._record_exchanged)
        self._exchange_ids = itertools.count()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def vend(
        self, cred: CredentialSnapshot, min_ttl: float, *, rejected_sha256: str | None = None
    ) -> Vended:
        if cred.status is CredentialStatus.DISABLED:
            raise CredentialDisabled("the credential is disabled by an admin")
        self.cache.note_vended(cred.id)
        deadline = time.monotonic() + self._deadline
        if rejected_sha256 is not None:
            return await self._vend_replacing(cred, min_ttl, rejected_sha256.lower(), deadline)
        if (cred.id, cred.version) not in self._inflight:
            # While this process is exchanging for the credential, the cache holds nothing
            # better: join the flight without asking Redis (a cold burst's thousand callers).
            cached = await self.cache.get(cred.id, cred.version)
            if cached is not None and cached.remaining() >= min_ttl:
                return Vended(cached, "hit")
        for _ in range(2):
            # A second round when the flight we joined settled for a JWT shorter than we need.
            jwt = await self._single_flight(cred, lambda j: j.remaining() >= min_ttl, deadline)
            if jwt.remaining() >= min_ttl:
                return Vended(jwt, "miss")
        raise TokenLifetimeTooShort(
            f"the upstream issued a JWT living {max(jwt.remaining(), 0):.0f} s, "
            f"less than the requested min_ttl of {min_ttl:.0f} s"
        )

    async def _vend_replacing(
        self, cred: CredentialSnapshot, min_ttl: float, rejected: str, deadline: float
    ) -> Vended:
        """Targeted refresh: a caller reports that Phrase refused the JWT with this SHA-256.
        Exchange only if the shared cache still holds that JWT, so a hundred callers reporting
        the same JWT cause one exchange, and a stale report is answered with the newer JWT."""

        def acceptable(j: CachedJwt) -> bool:
            return j.remaining() >= min_ttl and not hmac.compare_digest(
                jwt_sha256(j.access_token), rejected
            )

        jwt = await self.cache.get_shared(cred.id, cred.version)
        if jwt is not None and acceptable(jwt):
            return Vended(jwt, "hit")
        if jwt is not None:
            await self.cache.withdraw(cred.id, cred.version, jwt)  # never hand it out again
        jwt = await self._single_flight(cred, acceptable, deadline)
        if not acceptable(jwt):
            raise TokenLifetimeTooShort("the upstream issued no usable replacement JWT")
        return Vended(jwt, "miss")

    async def refresh(self, cred: CredentialSnapshot, due_expires_at: float) -> CachedJwt:
        """Proactive refresh: exchange unless someone already stored a JWT living longer than the
        one that fell due."""
        deadline = time.monotonic() + self._deadline
        return await self._single_flight(cred, lambda j: j.expires_at > due_expires_at, deadline)

    async def report_recovered(self, cred: CredentialSnapshot) -> None:
        """An admin cleared a rejection (rotation): tell whoever listens to status changes.
        (async so that FastAPI runs it on the event loop, where the listeners start tasks.)"""
        if self._on_status_change is not None:
            self._on_status_change(cred, "credential.recovered", None)

    async def purge(self, cred_id: uuid.UUID, version: int) -> None:
        await self.cache.purge(cred_id, version)

    async def _single_flight(
        self, cred: CredentialSnapshot, acceptable: Acceptable, deadline: float
    ) -> CachedJwt:
        key = (cred.id, cred.version)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(cred, acceptable, deadline))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        else:
            SINGLE_FLIGHT_WAITS.labels("process").inc()
        # Shielded: a caller that gives up (client gone, deadline) must not cancel the exchange
        # the other callers are waiting for.
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(task)
        except TimeoutError:
            raise UpstreamTimeout("no JWT within the request deadline") from None

    def _forget(self, key: tuple[uuid.UUID, int], task: asyncio.Task[CachedJwt]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, so a failure nobody awaited is not reported as lost

    async def _refresh(
        self, cred: CredentialSnapshot, acceptable: Acceptable, deadline: float
    ) -> CachedJwt:
        owner = await self._acquire(cred, acceptable, deadline)
        if isinstance(owner, CachedJwt):
            return owner
        try:
            if owner != LOCAL_OWNER:
                jwt = await self.cache.get_shared(cred.id, cred.version)
                if jwt is not None and acceptable(jwt):
                    return jwt  # another replica exchanged while we waited for the lock
            code = await self.cache.rejected(cred.id, cred.version)
            if code is not None:
                # Negative cache: the IdM refused this API token moments ago; asking again only
                # burns its rate limit until an admin rotates the token.
                raise CredentialRejected(upstream_error=code)
            return await self._exchange(cred, deadline)
        finally:
            await self.cache.unlock(cred.id, owner)

    async def _acquire(
        self, cred: CredentialSnapshot, acceptable: Acceptable, deadline: float
    ) -> str | CachedJwt:
        """The lock's owner token, or the JWT another replica stored while we waited."""
        waited = False
        while (owner := await self.cache.try_lock(cred.id, self._lock_ttl)) is None:
            # Another replica is exchanging. Its lock expires after lock_ttl even if it dies.
            if not waited:
                SINGLE_FLIGHT_WAITS.labels("cluster").inc()
                waited = True
            if time.monotonic() >= deadline:
                raise UpstreamTimeout("another replica's exchange did not finish in time")
            await asyncio.sleep(LOCK_POLL_SECONDS)
            jwt = await self.cache.get_shared(cred.id, cred.version)
            if jwt is not None and acceptable(jwt):
                return jwt
        return owner

    async def _exchange(self, cred: CredentialSnapshot, deadline: float) -> CachedJwt:
        try:
            api_token = self._keyring.open(cred.sealed_token, cred.aad).decode()
        except DecryptionFailed:
            log.error("credential.decrypt.failed credential_id=%s", cred.id)
            raise CredentialUnreadable("the stored API token cannot be decrypted") from None
        region = cred.region.value
        attempt = 0
        while True:
            state = await self._breaker.before(cred.region)
            started = time.monotonic()
            try:
                exchanged = await self._idm.exchange(cred.region, api_token)
            except CredentialRejected as exc:
                EXCHANGES.labels(region, "rejected").inc()
                await self._breaker.success(cred.region, state)  # the region works
                await self.cache.set_rejected(
                    cred.id, cred.version, exc.upstream_error, self._rejected_retry
                )
                await self._record(cred, rejected=exc.upstream_error)
                raise
            except (UpstreamUnavailable, UpstreamBadResponse) as exc:
                EXCHANGES.labels(region, _result(exc)).inc()
                await self._breaker.failure(cred.region)
                retry_after = getattr(exc, "retry_after", None)
                delay = self._retry.delay(attempt, retry_after)
                attempt += 1
                if attempt > self._retry.retries or time.monotonic() + delay >= deadline:
                    raise
                log.info("upstream.retry region=%s attempt=%d delay=%.2f", region, attempt, delay)
                await asyncio.sleep(delay)
                continue
            finally:
                EXCHANGE_DURATION.labels(region).observe(time.monotonic() - started)
            EXCHANGES.labels(region, "ok").inc()
            await self._breaker.success(cred.region, state)
            break
        jwt = CachedJwt(
            exchanged.access_token,
            expiry_of(exchanged.access_token, exchanged.requested_at, exchanged.expires_in),
        )
        now = time.time()
        await self.cache.put(
            cred.id, cred.version, jwt, cache_ttl(jwt.expires_at, self._margin, now)
        )
        await self.cache.schedule_refresh(cred.id, cred.version, self._refresh_due(jwt, now))
        await self._record(cred, rejected=None)
        return jwt

    def _refresh_due(self, jwt: CachedJwt, now: float) -> float:
        jitter = random.uniform(-self._refresh_jitter, self._refresh_jitter)
        due = now + (jwt.expires_at - now) * self._refresh_fraction * (1 + jitter)
        # Never later than the moment the entry leaves the cache.
        return min(due, jwt.expires_at - self._margin)

    async def _record(self, cred: CredentialSnapshot, *, rejected: str | None) -> None:
        """Note the exchange's outcome on the row, and report status changes (rejected or
        recovered) exactly once, however many replicas race. Best effort: the JWT matters more."""
        try:
            if rejected is None:
                changed = await self._exchanged.load(
                    (cred.id, cred.version, next(self._exchange_ids))
                )
            else:
                changed = await self._record_rejected(cred, rejected)
        except (SQLAlchemyError, OSError):
            log.warning("credential.status.write_failed credential_id=%s", cred.id)
            return
        if changed and self._on_status_change is not None:
            event = "credential.rejected" if rejected is not None else "credential.recovered"
            if rejected is not None:
                CREDENTIALS_REJECTED.labels(cred.region.value).inc()
            self._on_status_change(cred, event, rejected)

    async def _record_exchanged(
        self, keys: list[tuple[uuid.UUID, int, int]]
    ) -> dict[tuple[uuid.UUID, int, int], bool]:
        """Successful exchanges, batched (a cold burst's hundred make one transaction): stamp
        `last_exchange_at`, and bring rejected credentials back; True for the one exchange that
        recovered each."""
        rows = _CREDENTIALS.c
        these = tuple_(rows.id, rows.version).in_(list({(cred_id, v) for cred_id, v, _ in keys}))
        async with self._sessionmaker() as session, session.begin():
            await session.execute(
                update(_CREDENTIALS)
                .where(these, rows.status != CredentialStatus.DISABLED)
                .values(last_exchange_at=utcnow())
            )
            recovered = await session.execute(
                update(_CREDENTIALS)
                .where(these, rows.status == CredentialStatus.REJECTED)
                .values(status=CredentialStatus.ACTIVE, last_error_code=None, last_error_at=None)
                .returning(rows.id, rows.version)
            )
            back = {(row.id, row.version) for row in recovered}
        out = {}
        for cred_id, version, exchange in keys:
            out[(cred_id, version, exchange)] = (cred_id, version) in back
            back.discard((cred_id, version))
        return out

    async def _record_rejected(self, cred: CredentialSnapshot, code: str) -> bool:
        rows = _CREDENTIALS.c
        base = update(_CREDENTIALS).where(
            rows.id == cred.id,
            rows.version == cred.version,
            rows.status != CredentialStatus.DISABLED,
        )
        now = utcnow()
        async with self._sessionmaker() as session, session.begin():
            changed = await session.execute(
                base.where(rows.status != CredentialStatus.REJECTED).values(
                    status=CredentialStatus.REJECTED, last_error_code=code, last_error_at=now
                )
            )
            if changed.rowcount:  # type: ignore[attr-defined]
                return True
            await session.execute(base.values(last_error_code=code, last_error_at=now))
            return False


# Core statements: the ORM's bulk-update bookkeeping costs more than the statements themselves.
_CREDENTIALS = cast(Table, Credential.__table__)


def _result(exc: Exception) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    return "bad_response"


__all__ = [
    "Broker",
    "CircuitState",
    "CredentialSnapshot",
    "RetryPolicy",
    "Vended",
    "cache_ttl",
    "expiry_of",
]
