"""A circuit breaker per Phrase region, shared by every replica through Redis when it is there.

Closed: exchanges go through; transient failures (429, 5xx, transport, timeout, garbage) are
counted in a sliding window. At `threshold` failures within `window` seconds it opens: misses fail
fast with 503 `upstream-unavailable` and a `Retry-After` of the remaining cool-down, and the
upstream is left alone. After `cooldown` it is half-open: exactly one exchange (the probe, elected
with `SET NX`) goes through; success closes the circuit, failure opens it for another cool-down.
A rejected API token is the credential's fault, not the region's, and does not count.

When Redis is unavailable each process keeps the same state machine in memory.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from app.core.config import Region
from app.integrations.phrase.client import UpstreamUnavailable
from app.metrics.registry import CIRCUIT_STATE
from app.tokens.cache import REDIS_FAILURES, RedisGate


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitOpen(UpstreamUnavailable):
    title = "Upstream circuit open"


# KEYS[1] the region's hash, KEYS[2] its probe key; ARGV now, window, threshold, cooldown. Counts
# a failure; opens the circuit when the window holds `threshold` of them, or at once when it had
# been open (a failed probe). Returns the open-until time or 0.
_FAILURE = """
local was_open = redis.call('HEXISTS', KEYS[1], 'open_until') == 1
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if n == 1 then redis.call('HSET', KEYS[1], 'since', ARGV[1]) end
local since = tonumber(redis.call('HGET', KEYS[1], 'since'))
if tonumber(ARGV[1]) - since > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'failures', 1, 'since', ARGV[1])
  n = 1
end
local open_until = 0
if was_open or n >= tonumber(ARGV[3]) then
  open_until = tonumber(ARGV[1]) + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'open_until', open_until, 'failures', 0, 'since', ARGV[1])
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], math.floor((tonumber(ARGV[2]) + tonumber(ARGV[4])) * 2000))
return tostring(open_until)
"""


# KEYS[1] the region's hash, KEYS[2] its probe key; ARGV now, cooldown in ms. One step, so that
# of the callers arriving after the cool-down exactly one becomes the probe: reading `open_until`
# and taking the probe key separately lets a caller that read the old state take the key again
# after a failed probe reopened the circuit. Returns {state, open_until}: 0 closed, 1 half-open
# (the caller is the probe), 2 open.
_BEFORE = """
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return {0, '0'} end
if tonumber(ARGV[1]) < open_until then return {2, tostring(open_until)} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return {1, '0'} end
return {2, '0'}
"""


@dataclass(slots=True)
class _Local:
    failures: int = 0
    since: float = 0.0
    open_until: float = 0.0
    probe_until: float = 0.0


class CircuitBreaker:
    def __init__(
        self,
        redis: Redis | None,
        prefix: str,
        gate: RedisGate,
        *,
        threshold: int,
        window: float,
        cooldown: float,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._gate = gate
        self._threshold = threshold
        self._window = window
        self._cooldown = cooldown
        self._local = {region: _Local() for region in Region}
        self._failure = redis.register_script(_FAILURE) if redis is not None else None
        self._before_script = redis.register_script(_BEFORE) if redis is not None else None

    def _key(self, region: Region) -> str:
        # Hash-tagged so the state and its probe key share a Redis Cluster slot (one script).
        return f"{self._prefix}{{circuit:{region.value}}}"

    def _use_redis(self) -> bool:
        return self._redis is not None and self._gate.allow()

    async def before(self, region: Region) -> CircuitState:
        """Raise `CircuitOpen` when the region's circuit refuses this exchange; otherwise the state
        it was let through in (HALF_OPEN means this exchange is the probe)."""
        now = time.time()
        if self._use_redis():
            assert self._before_script is not None
            try:
                verdict, until = await self._before_script(
                    keys=[self._key(region), f"{self._key(region)}:probe"],
                    args=[now, int(self._cooldown * 1000)],
                )
                self._gate.ok()
            except REDIS_FAILURES as exc:
                self._gate.failed("circuit", exc)
                return self._before_local(region, now)
            state = CircuitState(int(verdict))
            if state is CircuitState.OPEN:
                raise self._open(region, float(until) - now)
            self._report(region, state)
            return state
        return self._before_local(region, now)

    def _before_local(self, region: Region, now: float) -> CircuitState:
        state = self._local[region]
        if now < state.open_until:
            raise self._open(region, state.open_until - now)
        if state.open_until:
            if now < state.probe_until:
                raise self._open(region, state.probe_until - now)
            # The probe's lease ends with a cool-down, as the shared probe key's TTL does: a probe
            # that never reports (cancelled, an unexpected error) must not keep it open forever.
            state.probe_until = now + self._cooldown
            self._report(region, CircuitState.HALF_OPEN)
            return CircuitState.HALF_OPEN
        return CircuitState.CLOSED

    async def success(self, region: Region, state: CircuitState) -> None:
        local = self._local[region]
        if local.failures or local.open_until:
            self._local[region] = _Local()
        if state is CircuitState.HALF_OPEN or self._redis is not None:
            await self._reset_shared(region, always=state is CircuitState.HALF_OPEN)
        self._report(region, CircuitState.CLOSED)

    async def _reset_shared(self, region: Region, *, always: bool) -> None:
        if not self._use_redis():
            return
        assert self._redis is not None
        try:
            if always or await self._redis.hget(self._key(region), "failures") not in (None, b"0"):
                await self._redis.delete(self._key(region), f"{self._key(region)}:probe")
            self._gate.ok()
        except REDIS_FAILURES as exc:
            self._gate.failed("circuit", exc)

    async def failure(self, region: Region) -> None:
        now = time.time()
        local = self._local[region]
        local.probe_until = 0.0
        if now - local.since > self._window:
            local.failures, local.since = 0, now
        local.failures += 1
        if local.failures >= self._threshold or local.open_until:
            local.open_until, local.failures, local.since = now + self._cooldown, 0, now
        opened = local.open_until > now
        if self._use_redis():
            assert self._failure is not None
            try:
                until = await self._failure(
                    keys=[self._key(region), f"{self._key(region)}:probe"],
                    args=[now, self._window, self._threshold, self._cooldown],
                )
                opened = opened or float(until) > now
                self._gate.ok()
            except REDIS_FAILURES as exc:
                self._gate.failed("circuit", exc)
        if opened:
            self._report(region, CircuitState.OPEN)

    def _open(self, region: Region, retry_after: float) -> CircuitOpen:
        self._report(region, CircuitState.OPEN)
        return CircuitOpen(
            f"the Phrase IdM ({region.value}) is failing; not calling it for a while",
            retry_after=max(1.0, retry_after),
        )

    @staticmethod
    def _report(region: Region, state: CircuitState) -> None:
        CIRCUIT_STATE.labels(region.value).set(int(state))
