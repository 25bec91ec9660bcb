"""Where vended JWTs live between exchanges: Redis (shared) or process memory (single process).

Redis layout, under the configured prefix (default `tokenvend:v1:`):

- `{cred:<id>}:jwt:<version>`: a hash `{exp, k, v}`: the JWT's `expires_at` in clear (so a write
  can refuse to replace a longer-lived JWT atomically), and the JWT sealed with AES-256-GCM under
  key `k`, the AAD being the Redis key's name. Its TTL ends `expiry_margin` before `expires_at`,
  so no replica can read an expired JWT. The version is the credential's rotation counter: a
  rotation orphans every older entry.
- `expiry`: a sorted set of `<id>:<version>` scored by `expires_at`: the cache keyed by expiry,
  for refresh scheduling and status views.
- `{cred:<id>}:lock`: the single-flight lock, an owner token set with `SET NX PX` and released
  by compare-and-delete.

The `{cred:<id>}` hash tag keeps one credential's entry and lock on one Redis Cluster shard.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from app.core.crypto import DecryptionFailed, Keyring, Sealed


@dataclass(frozen=True, slots=True)
class CachedJwt:
    access_token: str
    expires_at: float  # epoch seconds

    def __repr__(self) -> str:
        return f"CachedJwt(expires_at={self.expires_at})"

    def remaining(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)


class TokenCache(Protocol):
    """The one interface of both backends. `ttl` is how long an entry may be served, in seconds."""

    name: str

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
        self._put = redis.register_script(_PUT_IF_NEWER)
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
        await self._redis.delete(self.entry_key(cred_id, version))
        await self._redis.zrem(self._expiry_key, f"{cred_id}:{version}")

    async def expires_at(self, cred_id: uuid.UUID, version: int) -> float | None:
        exp = await self._redis.hget(self.entry_key(cred_id, version), "exp")
        return None if exp is None else float(exp)

    async def try_lock(self, cred_id: uuid.UUID, ttl: float) -> str | None:
        owner = secrets.token_hex(16)
        ok = await self._redis.set(self.lock_key(cred_id), owner, nx=True, px=int(ttl * 1000))
        return owner if ok else None

    async def unlock(self, cred_id: uuid.UUID, owner: str) -> None:
        await self._unlock(keys=[self.lock_key(cred_id)], args=[owner])

    async def ping(self) -> None:
        await asyncio.wait_for(self._redis.ping(), timeout=1.0)

    async def close(self) -> None:
        await self._redis.aclose()
