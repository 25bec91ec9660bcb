"""Rate limits per client key: GCRA (the generic cell rate algorithm, a token bucket stored as one
timestamp), shared by every replica through Redis, per process while Redis is unavailable.

A client may send `rate` requests per second on average with bursts of up to `burst`; beyond that
it gets 429 `rate-limited` with the `Retry-After` that would have let the request through.

The check is the one Redis call of an authenticated request, so it also carries the read of the
cache generation (`app.core.localcache`): both in one script, whose calls from concurrent requests
share round trips (`app.core.autopipeline`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript

from app.core.autopipeline import ScriptPipeline
from app.core.errors import TokenvendError
from app.core.localcache import Invalidation
from app.tokens.cache import REDIS_FAILURES, RedisGate

# KEYS[1] the client's key; ARGV now_ms, interval_ms (1000 / rate), tolerance_ms (interval * burst).
# Returns 0 when allowed (and records it), else the milliseconds to wait.
# The value is `<tat>:<interval>`: the interval it was computed at.
_GCRA_BODY = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local at = string.find(stored, ':', 1, true)
  tat = tonumber(at and string.sub(stored, 1, at - 1) or stored)
  local was = at and tonumber(string.sub(stored, at + 1)) or interval
  -- A debt run up at another rate counts at most as a full burst at this one: a raised limit
  -- takes effect on the client's next request.
  if was ~= interval then tat = math.min(tat, now + tonumber(ARGV[3]) - interval) end
end
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tonumber(ARGV[3]) - now
if wait <= 0 then
  redis.call('SET', KEYS[1], tostring(new_tat) .. ':' .. tostring(interval),
             'PX', math.ceil(new_tat - now) + 1000)
  wait = 0
end
"""
_GCRA = _GCRA_BODY + "return math.ceil(wait)"
# The same, also reading the cache generation (KEYS[2]): the request's one round trip. Only where
# both keys may be touched by one script (not in a Redis Cluster: they live in other slots).
_GCRA_AND_GENERATION = _GCRA_BODY + "return {math.ceil(wait), redis.call('GET', KEYS[2])}"


class RateLimited(TokenvendError):
    code = "rate-limited"
    title = "Rate limited"

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests for this client key; slow down")
        self.retry_after = retry_after


class RateLimiter:
    def __init__(
        self,
        redis: Redis | None,
        prefix: str,
        gate: RedisGate,
        invalidation: Invalidation,
        *,
        burst: int,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._gate = gate
        self._inv = invalidation
        self._burst = burst
        self._cluster = isinstance(redis, RedisCluster)
        self._script: ScriptPipeline | AsyncScript | None = None
        if redis is not None:
            # Outside a cluster, concurrent requests' checks share round trips.
            self._script = (
                redis.register_script(_GCRA)
                if self._cluster
                else ScriptPipeline(redis, _GCRA_AND_GENERATION)
            )
        self._local: dict[uuid.UUID, tuple[float, float]] = {}  # tat, interval

    async def admit(self, client_id: uuid.UUID, rate: float) -> float:
        """Seconds this client must wait before this request would be within `rate` requests per
        second (0: admitted and counted). Also settles whether process memory is current."""
        now_ms = time.time() * 1000
        interval = 1000.0 / rate
        tolerance = interval * self._burst
        if self._redis is not None and self._script is not None and self._gate.allow():
            keys = [f"{self._prefix}ratelimit:{client_id}"]
            args = [repr(now_ms), repr(interval), repr(tolerance)]
            try:
                if self._cluster:
                    # The two keys live in different slots: two commands in flight at once.
                    generation, wait = await asyncio.gather(
                        self._redis.get(self._inv.key), self._script(keys=keys, args=args)
                    )
                else:
                    # EVALSHA, pipelined with other requests' (no SCRIPT EXISTS round trips).
                    wait, generation = await self._script(keys=[*keys, self._inv.key], args=args)
                self._gate.ok()
            except REDIS_FAILURES as exc:
                self._gate.failed("ratelimit", exc)
            else:
                self._inv.observe(generation if isinstance(generation, bytes) else None)
                return math.ceil(int(wait) / 1000) if int(wait) > 0 else 0.0
        if self._redis is not None:
            self._inv.distrust()
        wait_ms = self._local_check(client_id, now_ms, interval, tolerance)
        return math.ceil(wait_ms / 1000) if wait_ms > 0 else 0.0

    def _local_check(self, client_id: uuid.UUID, now: float, interval: float, tol: float) -> float:
        if len(self._local) > 100_000:
            self._local.clear()
        tat, was = self._local.get(client_id, (now, interval))
        if was != interval:  # as in the script: a changed rate starts from at most a full burst
            tat = min(tat, now + tol - interval)
        tat = max(tat, now)
        new_tat = tat + interval
        wait = new_tat - tol - now
        if wait > 0:
            return wait
        self._local[client_id] = (new_tat, interval)
        return 0.0
