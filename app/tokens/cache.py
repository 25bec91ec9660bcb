"""Where vended JWTs live between exchanges: Redis (shared) or process memory (single process).

Redis layout, under the configured prefix (default `tokenvend:v1:`):

- `{cred:<id>}:jwt:<version>`: a hash `{exp, k, v}`: the JWT's `expires_at` in clear (so a write
  can refuse to replace a longer-lived JWT atomically), and the JWT sealed with AES-256-GCM under
  key `k`, the AAD being the Redis key's name. Its TTL ends `expiry_margin` before `expires_at`,
  so no replica can read an expired JWT. The version is the credential's rotation counter: a
  rotation orphans every older entry.
- `expiry`: a sorted set of `<id>:<version>` scored by `expires_at`: the cache keyed by expiry,
  for refresh scheduling and status views.
- `refresh`: a sorted set of `<id>:<version>` scored by when the proactive refresher should
  exchange it anew (a fraction of its lifetime, jittered); a tick reads only what is due.
- `vended`: a sorted set of credential ids scored by when they were last vended (batched once a
  second per replica), so only credentials in use are refreshed.
- `{cred:<id>}:lock`: the single-flight lock, an owner token set with `SET NX PX` and released
  by compare-and-delete.
- `{cred:<id>}:rejected:<version>`: the negative cache of an API token the IdM refused.

The `{cred:<id>}` hash tag keeps one credential's entry and lock on one Redis Cluster shard.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from app.core.crypto import DecryptionFailed, Keyring, Sealed
from app.core.jwt import fingerprint
from app.core.localcache import Invalidation
from app.metrics.registry import CACHE_FALLBACKS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CachedJwt:
    access_token: str
    expires_at: float  # epoch seconds
    # For the audit record of every vend: computed once per JWT, not once per request.
    fingerprint: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.access_token))

    def __repr__(self) -> str:
        return f"CachedJwt(expires_at={self.expires_at})"

    def remaining(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


class TokenCache(Protocol):
    """The one interface of both backends. `ttl` is how long an entry may be served, in seconds."""

    @property
    def name(self) -> str: ...

    async def get(self, cred_id: uuid.UUID, version: int) -> CachedJwt | None: ...

    async def put(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt, ttl: float) -> bool:
        """Store unless a JWT that lives at least as long is already there; True if stored."""
        ...

    async def purge(self, cred_id: uuid.UUID, version: int) -> None: ...

    async def expires_at(self, cred_id: uuid.UUID, version: int) -> float | None:
        """The cached JWT's `expires_at` without opening it, or None when nothing is cached."""
        ...

    async def try_lock(self, cred_id: uuid.UUID, ttl: float) -> str | None:
        """Take the credential's exchange lock; the owner token, or None if someone holds it."""
        ...

    async def unlock(self, cred_id: uuid.UUID, owner: str) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """Process-local backend for the embedded default; one process only (see `serve`)."""

    name = "memory"

    def __init__(self) -> None:
        self._entries: dict[tuple[uuid.UUID, int], tuple[CachedJwt, float]] = {}
        self._locks: dict[uuid.UUID, tuple[str, float]] = {}

    async def get(self, cred_id: uuid.UUID, version: int) -> CachedJwt | None:
        found = self._entries.get((cred_id, version))
        if found is None:
            return None
        jwt, serve_until = found
        if time.monotonic() >= serve_until:
            del self._entries[(cred_id, version)]
            return None
        return jwt

    async def put(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt, ttl: float) -> bool:
        current = await self.get(cred_id, version)
        if ttl <= 0 or (current is not None and current.expires_at >= jwt.expires_at):
            return False
        self._entries[(cred_id, version)] = (jwt, time.monotonic() + ttl)
        return True

    async def purge(self, cred_id: uuid.UUID, version: int) -> None:
        self._entries.pop((cred_id, version), None)

    async def withdraw(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt) -> bool:
        """Purge the entry only if it still holds `jwt`; True if it did."""
        found = self._entries.get((cred_id, version))
        if found is None or found[0] != jwt:
            return False
        del self._entries[(cred_id, version)]
        return True

    async def expires_at(self, cred_id: uuid.UUID, version: int) -> float | None:
        jwt = await self.get(cred_id, version)
        return None if jwt is None else jwt.expires_at

    async def try_lock(self, cred_id: uuid.UUID, ttl: float) -> str | None:
        now = time.monotonic()
        held = self._locks.get(cred_id)
        if held is not None and held[1] > now:
            return None
        owner = secrets.token_hex(16)
        self._locks[cred_id] = (owner, now + ttl)
        return owner

    async def unlock(self, cred_id: uuid.UUID, owner: str) -> None:
        held = self._locks.get(cred_id)
        if held is not None and secrets.compare_digest(held[0], owner):
            del self._locks[cred_id]

    async def ping(self) -> None:
        return None

    def clear(self) -> None:
        self._entries.clear()

    async def close(self) -> None:
        self._entries.clear()


# KEYS[1] entry hash; ARGV: exp, kid, sealed, ttl_ms.
# Refuses to replace an entry that lives at least as long: a slow exchange that finishes after a
# newer one must not shorten the cached JWT's life.
_PUT_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'exp')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'exp', ARGV[1], 'k', ARGV[2], 'v', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS[1] entry hash; ARGV: exp. Deletes the entry only while it holds the JWT with this expiry,
# so a caller that read a refused JWT cannot delete the replacement stored since.
_DELETE_IF_EXP = """
local cur = redis.call('HGET', KEYS[1], 'exp')
if cur and tonumber(cur) == tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
"""

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisCache:
    name = "redis"

    def __init__(self, redis: Redis, keyring: Keyring, prefix: str) -> None:
        self._redis = redis
        self._keyring = keyring
        self._prefix = prefix
        self._expiry_key = f"{prefix}expiry"
        self._refresh_key = f"{prefix}refresh"
        self._vended_key = f"{prefix}vended"
        self._put = redis.register_script(_PUT_IF_NEWER)
        self._delete_if_exp = redis.register_script(_DELETE_IF_EXP)
        self._unlock = redis.register_script(_COMPARE_AND_DELETE)

    def entry_key(self, cred_id: uuid.UUID, version: int) -> str:
        return f"{self._prefix}{{cred:{cred_id}}}:jwt:{version}"

    def lock_key(self, cred_id: uuid.UUID) -> str:
        return f"{self._prefix}{{cred:{cred_id}}}:lock"

    async def get(self, cred_id: uuid.UUID, version: int) -> CachedJwt | None:
        key = self.entry_key(cred_id, version)
        exp, kid, blob = await self._redis.hmget(key, ["exp", "k", "v"])
        if not (isinstance(exp, bytes) and isinstance(kid, bytes) and isinstance(blob, bytes)):
            return None
        try:
            token = self._keyring.open(Sealed(kid.decode(), blob), key.encode())
        except DecryptionFailed:
            return None  # a key no longer in the keyring, or tampering: exchange anew
        return CachedJwt(token.decode(), float(exp))

    async def put(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt, ttl: float) -> bool:
        ttl_ms = int(ttl * 1000)
        if ttl_ms <= 0:
            return False
        key = self.entry_key(cred_id, version)
        sealed = self._keyring.seal(jwt.access_token.encode(), key.encode())
        stored = await self._put(
            keys=[key],
            args=[repr(jwt.expires_at), sealed.key_id, sealed.blob, ttl_ms],
        )
        if stored:
            # The index lives on another shard than the entry, so it is updated outside the
            # script; GT keeps it from moving backwards.
            await self._redis.zadd(
                self._expiry_key, {f"{cred_id}:{version}": jwt.expires_at}, gt=True
            )
        return bool(stored)

    async def purge(self, cred_id: uuid.UUID, version: int) -> None:
        member = f"{cred_id}:{version}"
        await self._redis.delete(
            self.entry_key(cred_id, version), self.rejected_key(cred_id, version)
        )
        await self._redis.zrem(self._expiry_key, member)
        await self._redis.zrem(self._refresh_key, member)

    async def withdraw(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt) -> bool:
        """Purge the entry only if it still holds `jwt` (same expiry); True if it did."""
        key = self.entry_key(cred_id, version)
        if not await self._delete_if_exp(keys=[key], args=[repr(jwt.expires_at)]):
            return False
        member = f"{cred_id}:{version}"
        await self._redis.zrem(self._expiry_key, member)
        await self._redis.zrem(self._refresh_key, member)
        return True

    async def expires_at(self, cred_id: uuid.UUID, version: int) -> float | None:
        exp = await self._redis.hget(self.entry_key(cred_id, version), "exp")
        return None if exp is None else float(exp)

    async def try_lock(self, cred_id: uuid.UUID, ttl: float) -> str | None:
        owner = secrets.token_hex(16)
        ok = await self._redis.set(self.lock_key(cred_id), owner, nx=True, px=int(ttl * 1000))
        return owner if ok else None

    async def unlock(self, cred_id: uuid.UUID, owner: str) -> None:
        await self._unlock(keys=[self.lock_key(cred_id)], args=[owner])

    async def ttl(self, cred_id: uuid.UUID, version: int) -> float:
        pttl = await self._redis.pttl(self.entry_key(cred_id, version))
        return max(0.0, pttl / 1000)

    def rejected_key(self, cred_id: uuid.UUID, version: int) -> str:
        return f"{self._prefix}{{cred:{cred_id}}}:rejected:{version}"

    async def rejected(self, cred_id: uuid.UUID, version: int) -> str | None:
        code = await self._redis.get(self.rejected_key(cred_id, version))
        return code.decode() if isinstance(code, bytes) else None

    async def set_rejected(self, cred_id: uuid.UUID, version: int, code: str, ttl: float) -> None:
        await self._redis.set(self.rejected_key(cred_id, version), code, px=int(ttl * 1000))

    async def schedule_refresh(self, cred_id: uuid.UUID, version: int, due: float) -> None:
        await self._redis.zadd(self._refresh_key, {f"{cred_id}:{version}": due})

    async def unschedule(self, cred_id: uuid.UUID, version: int) -> None:
        await self._redis.zrem(self._refresh_key, f"{cred_id}:{version}")

    async def due_refreshes(self, now: float, limit: int) -> list[tuple[uuid.UUID, int, float]]:
        rows = await self._redis.zrangebyscore(
            self._refresh_key, "-inf", now, start=0, num=limit, withscores=True
        )
        due = []
        for member, score in cast(list[tuple[bytes, float]], rows):
            cid, _, version = member.decode().partition(":")
            due.append((uuid.UUID(cid), int(version), float(score)))
        return due

    async def mark_vended(self, cred_ids: Iterable[uuid.UUID], at: float) -> None:
        await self._redis.zadd(self._vended_key, {str(c): at for c in cred_ids}, gt=True)

    async def last_vended(self, cred_id: uuid.UUID) -> float | None:
        score = await self._redis.zscore(self._vended_key, str(cred_id))
        return None if score is None else float(score)

    async def ping(self) -> None:
        await asyncio.wait_for(self._redis.ping(), timeout=1.0)

    async def close(self) -> None:
        await self._redis.aclose()


class RedisGate:
    """Decides whether to try Redis: after a failure, requests skip it for `backoff` seconds, then
    one probe goes through; its success ends the degradation. So a dead or hung Redis costs one
    timeout per `backoff`, not one per request, and recovery needs no restart."""

    def __init__(self, backoff: float = 1.0) -> None:
        self._backoff = backoff
        self._retry_at = 0.0
        self._probing = False
        self.degraded = False

    def allow(self) -> bool:
        if not self.degraded:
            return True
        if self._probing or time.monotonic() < self._retry_at:
            return False
        self._probing = True
        return True

    def ok(self) -> None:
        if self.degraded:
            log.warning("cache.redis.recovered")
        self.degraded = self._probing = False

    def failed(self, operation: str, exc: BaseException) -> None:
        if not self.degraded:
            log.warning("cache.redis.degraded operation=%s error=%s", operation, type(exc).__name__)
        self.degraded, self._probing = True, False
        self._retry_at = time.monotonic() + self._backoff

    def release(self) -> None:
        """A probe that ended without a verdict (cancelled) lets the next one through."""
        self._probing = False


# What a sick Redis raises: connection and timeout errors, and the cluster client's own errors
# (RedisClusterException is not a RedisError) when slots are unreachable.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
T = TypeVar("T")


class TieredCache:
    """What the broker talks to: the JWT in process memory (L1) in front of Redis (L2, shared).

    L1 entries are keyed by credential id and version, so a rotation (new version, read from the
    database) can never be answered from L1. Flushes from `Invalidation` clear L1 (evictions).
    When Redis fails, every operation falls back to process memory: JWTs, locks (then only the
    in-process single flight holds: at most one exchange per process), the rejected-credential
    negative cache and the refresh schedule.
    """

    def __init__(
        self,
        shared: RedisCache | None,
        invalidation: Invalidation,
        *,
        gate: RedisGate | None = None,
    ) -> None:
        self.shared = shared
        self.local = MemoryCache()
        self.gate = gate or RedisGate()
        self._inv = invalidation
        self._epoch = invalidation.epoch
        self._rejected: dict[tuple[uuid.UUID, int], tuple[str, float]] = {}
        self._due: dict[tuple[uuid.UUID, int], float] = {}
        self._vended: dict[uuid.UUID, float] = {}
        self._vended_unsent: set[uuid.UUID] = set()
        self._held: dict[str, float] = {}  # Redis lock owner -> when its TTL runs out
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:
        return "redis" if self.shared is not None else "memory"

    @property
    def degraded(self) -> bool:
        return self.gate.degraded

    async def _try(
        self, operation: str, call: Callable[[RedisCache], Awaitable[T]]
    ) -> tuple[bool, T | None]:
        """(True, result) from Redis, or (False, None) when Redis is absent, skipped or failing."""
        if self.shared is None:
            return False, None
        if not self.gate.allow():
            CACHE_FALLBACKS.labels(operation).inc()
            return False, None
        try:
            result = await call(self.shared)
        except REDIS_FAILURES as exc:
            self.gate.failed(operation, exc)
            CACHE_FALLBACKS.labels(operation).inc()
            return False, None
        except BaseException:
            self.gate.release()
            raise
        self.gate.ok()
        return True, result

    def _local(self) -> MemoryCache:
        if self._epoch != self._inv.epoch:
            self._epoch = self._inv.epoch
            self.local.clear()
        return self.local

    async def get(self, cred_id: uuid.UUID, version: int) -> CachedJwt | None:
        local = self._local()
        jwt = await local.get(cred_id, version)
        if jwt is not None:
            return jwt
        epoch = self._inv.epoch
        ok, jwt = await self._try("get", lambda r: r.get(cred_id, version))
        if ok and jwt is not None:
            ttl = await self._try_ttl(cred_id, version)
            # A flush that arrived during the read voids it: the JWT read may be the one flushed.
            if self._inv.epoch == epoch:
                await self._local().put(cred_id, version, jwt, ttl)
        return jwt

    async def _try_ttl(self, cred_id: uuid.UUID, version: int) -> float:
        ok, ttl = await self._try("ttl", lambda r: r.ttl(cred_id, version))
        return ttl if ok and ttl is not None else 0.0

    async def get_shared(self, cred_id: uuid.UUID, version: int) -> CachedJwt | None:
        """The JWT every replica sees (L2), falling back to L1 when Redis is unavailable."""
        if self.shared is None:
            return await self._local().get(cred_id, version)
        ok, jwt = await self._try("get", lambda r: r.get(cred_id, version))
        return jwt if ok else await self._local().get(cred_id, version)

    async def put(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt, ttl: float) -> bool:
        # Redis first: when it refuses because another replica stored a longer-lived JWT, this
        # replica must not go on serving the shorter one (or an older one) from L1.
        ok, stored = await self._try("put", lambda r: r.put(cred_id, version, jwt, ttl))
        if ok and not stored:
            await self._local().purge(cred_id, version)  # the next read takes the shared one
            return False
        return await self._local().put(cred_id, version, jwt, ttl) or bool(ok)

    async def purge(self, cred_id: uuid.UUID, version: int) -> None:
        await self.local.purge(cred_id, version)
        self._due.pop((cred_id, version), None)
        await self._try("purge", lambda r: r.purge(cred_id, version))

    async def withdraw(self, cred_id: uuid.UUID, version: int, jwt: CachedJwt) -> None:
        """Take a JWT out of service everywhere (Phrase refused it): purge it where it is still
        the cached one, leaving a replacement stored meanwhile alone, and flush every replica's
        L1, which may hold it too."""
        here = await self.local.withdraw(cred_id, version, jwt)
        ok, shared = await self._try("withdraw", lambda r: r.withdraw(cred_id, version, jwt))
        # Only the caller that withdrew it flushes: a hundred reports make one flush.
        if shared or (here and not ok):
            self._due.pop((cred_id, version), None)
            await self._inv.bump()

    async def expires_at(self, cred_id: uuid.UUID, version: int) -> float | None:
        ok, exp = await self._try("expires_at", lambda r: r.expires_at(cred_id, version))
        return exp if ok else await self.local.expires_at(cred_id, version)

    async def try_lock(self, cred_id: uuid.UUID, ttl: float) -> str | None:
        ok, owner = await self._try("lock", lambda r: r.try_lock(cred_id, ttl))
        if ok and owner is not None:
            self._held[owner] = time.monotonic() + ttl
        return owner if ok else LOCAL_OWNER

    async def unlock(self, cred_id: uuid.UUID, owner: str) -> None:
        if owner == LOCAL_OWNER:
            return
        ok, _ = await self._try("unlock", lambda r: r.unlock(cred_id, owner))
        expires = self._held.pop(owner, 0.0)
        if not ok and expires > time.monotonic():
            # A lock left in Redis makes every other replica wait for it until its TTL, past
            # their deadlines (504s): release it as soon as Redis answers, gate or no gate.
            task = asyncio.create_task(self._release_later(cred_id, owner, expires))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_later(self, cred_id: uuid.UUID, owner: str, expires: float) -> None:
        assert self.shared is not None
        while time.monotonic() < expires:
            await asyncio.sleep(RELEASE_RETRY_SECONDS)
            try:
                await self.shared.unlock(cred_id, owner)
            except REDIS_FAILURES:
                continue
            return

    async def rejected(self, cred_id: uuid.UUID, version: int) -> str | None:
        ok, code = await self._try("rejected", lambda r: r.rejected(cred_id, version))
        if ok:
            return code
        found = self._rejected.get((cred_id, version))
        return found[0] if found and found[1] > time.monotonic() else None

    async def set_rejected(self, cred_id: uuid.UUID, version: int, code: str, ttl: float) -> None:
        if ttl <= 0:
            return
        self._rejected[(cred_id, version)] = (code, time.monotonic() + ttl)
        await self._try("set_rejected", lambda r: r.set_rejected(cred_id, version, code, ttl))

    async def schedule_refresh(self, cred_id: uuid.UUID, version: int, due: float) -> None:
        self._due[(cred_id, version)] = due
        await self._try("schedule", lambda r: r.schedule_refresh(cred_id, version, due))

    async def unschedule(self, cred_id: uuid.UUID, version: int) -> None:
        self._due.pop((cred_id, version), None)
        await self._try("unschedule", lambda r: r.unschedule(cred_id, version))

    async def due_refreshes(self, now: float, limit: int) -> list[tuple[uuid.UUID, int, float]]:
        ok, due = await self._try("due", lambda r: r.due_refreshes(now, limit))
        if ok and due is not None:
            return due
        local = sorted((d, c, v) for (c, v), d in self._due.items() if d <= now)[:limit]
        return [(c, v, d) for d, c, v in local]

    def note_vended(self, cred_id: uuid.UUID) -> None:
        """Cheap: a set add on the hot path; `flush_vended` ships the set to Redis once a tick."""
        self._vended_unsent.add(cred_id)

    async def flush_vended(self, resolution: float = 0.0) -> None:
        """Ship what was vended since the last flush to Redis, leaving out credentials shipped
        less than `resolution` seconds ago: the refresher asks "vended within the window?", so a
        sixtieth of the window is precision enough, and a replica serving thousands of
        credentials sends a few of them a second instead of all of them every tick."""
        if not self._vended_unsent:
            return
        now = time.time()
        batch, self._vended_unsent = self._vended_unsent, set()
        if resolution > 0:
            batch = {c for c in batch if now - self._vended.get(c, 0.0) >= resolution}
            if not batch:
                return
        for cred_id in batch:
            self._vended[cred_id] = now
        await self._try("vended", lambda r: r.mark_vended(batch, now))

    async def last_vended(self, cred_id: uuid.UUID) -> float | None:
        ok, at = await self._try("vended", lambda r: r.last_vended(cred_id))
        local = self._vended.get(cred_id)
        if ok and at is not None:
            return max(at, local or 0.0)
        return local

    async def ping(self) -> None:
        if self.shared is not None:
            await self.shared.ping()

    async def close(self) -> None:
        for task in self._releases:
            task.cancel()
        if self.shared is not None:
            await self.shared.close()


LOCAL_OWNER = "local"
RELEASE_RETRY_SECONDS = 0.2
