"""Proactive refresh: exchange a credential's JWT once a fraction of its life has passed, so that
callers keep hitting the cache and the upstream can be down for a while unnoticed.

One leader across all replicas does the work, elected with a Redis lease (`SET NX PX` with an
owner token, renewed each tick by compare-and-pexpire); when the leader dies, its lease runs out
and another replica takes over. A tick reads only what is due from the `refresh` sorted set
(O(due), not O(all)), and refreshes only credentials vended within the recent window. When Redis
is unavailable every process refreshes what it knows of itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid

from redis.asyncio import Redis

from app.core.errors import TokenvendError
from app.credentials.models import CredentialStatus
from app.metrics.registry import JWT_MIN_REMAINING, REFRESHER_LAG, REFRESHER_RUNS, REFRESHES
from app.tokens.broker import Broker
from app.tokens.cache import REDIS_FAILURES, TieredCache
from app.tokens.lookup import CredentialDirectory

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

BATCH = 100
CONCURRENCY = 8
RETRY_FAILED_AFTER = 10.0


class Refresher:
    def __init__(
        self,
        *,
        broker: Broker,
        cache: TieredCache,
        directory: CredentialDirectory,
        redis: Redis | None,
        prefix: str,
        interval: float,
        window: float,
    ) -> None:
        self._broker = broker
        self._cache = cache
        self._directory = directory
        self._redis = redis
        self._lease_key = f"{prefix}refresher:leader"
        self._lease_ms = int(max(3.0, interval * 5) * 1000)
        self._owner = secrets.token_hex(16)
        self._interval = interval
        self._window = window
        self._renew = redis.register_script(_RENEW) if redis is not None else None
        self._task: asyncio.Task[None] | None = None
        self.leader = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="refresher")

    async def stop(self) -> None:
        if self._task is not None:
            # Cancel until it has ended. On Python 3.11 a cancellation that arrives just as a
            # Redis write completes is lost (redis-py wraps writes in asyncio.wait_for, which
            # then returns the result instead; fixed in 3.12): the loop would go on sleeping and
            # a plain `await self._task` would keep shutdown waiting forever.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._resign()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._cache.flush_vended(resolution=self._window / 60)
                if not await self._lead():
                    REFRESHER_RUNS.labels("not_leader").inc()
                    continue
                await self.tick()
                REFRESHER_RUNS.labels("ok").inc()
            except asyncio.CancelledError:
                raise
            except Exception:
                REFRESHER_RUNS.labels("error").inc()
                log.exception("refresher.tick.failed")

    async def _lead(self) -> bool:
        if self._redis is None or self._cache.degraded:
            self.leader = True  # alone, or cut off: refresh what this process knows
            return True
        assert self._renew is not None
        try:
            if self.leader and await self._renew(
                keys=[self._lease_key], args=[self._owner, self._lease_ms]
            ):
                return True
            self.leader = bool(
                await self._redis.set(self._lease_key, self._owner, nx=True, px=self._lease_ms)
            )
        except REDIS_FAILURES:
            self.leader = True
        if self.leader:
            log.info("refresher.leader.elected")
        return self.leader

    async def _resign(self) -> None:
        if self._redis is not None and self.leader:
            with contextlib.suppress(*REDIS_FAILURES):
                await self._redis.eval(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                    "return redis.call('DEL', KEYS[1]) end return 0",
                    1,
                    self._lease_key,
                    self._owner,
                )
        self.leader = False

    async def tick(self) -> int:
        """Refresh what is due; the number of JWTs refreshed."""
        now = time.time()
        due = await self._cache.due_refreshes(now, BATCH)
        REFRESHER_LAG.set(max(0.0, now - min(d for _, _, d in due)) if due else 0.0)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(cred_id: uuid.UUID, version: int) -> bool:
            async with gate:
                return await self._refresh_one(cred_id, version, now)

        results = await asyncio.gather(*(one(c, v) for c, v, _ in due))
        await self._report_min_remaining(now)
        return sum(results)

    async def _refresh_one(self, cred_id: uuid.UUID, version: int, now: float) -> bool:
        last = await self._cache.last_vended(cred_id)
        if last is None or last < now - self._window:
            await self._cache.unschedule(cred_id, version)  # nobody asks: let it expire
            return False
        cred = await self._directory.by_id(cred_id)
        if cred is None or cred.version != version or cred.status is not CredentialStatus.ACTIVE:
            await self._cache.unschedule(cred_id, version)
            return False
        current = await self._cache.expires_at(cred_id, version) or 0.0
        try:
            await self._broker.refresh(cred, current)
        except TokenvendError as exc:
            REFRESHES.labels("error").inc()
            log.warning("refresher.refresh.failed credential_id=%s code=%s", cred_id, exc.code)
            await self._cache.schedule_refresh(cred_id, version, time.time() + RETRY_FAILED_AFTER)
            return False
        REFRESHES.labels("ok").inc()
        return True

    async def _report_min_remaining(self, now: float) -> None:
        upcoming = await self._cache.due_refreshes(float("inf"), 1)
        if not upcoming:
            return
        cred_id, version, _ = upcoming[0]
        expires_at = await self._cache.expires_at(cred_id, version)
        if expires_at is not None:
            JWT_MIN_REMAINING.set(expires_at - now)
