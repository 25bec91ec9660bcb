"""The two cache backends behind one interface, and the Redis layout of design.md."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.core.crypto import Keyring
from app.core.localcache import Invalidation
from app.tokens.cache import CachedJwt, MemoryCache, RedisCache, TieredCache, TokenCache
from tests.fixtures.services import REDIS_URL

KEYRING = Keyring.parse(Keyring.generate_spec("cache"))


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[TokenCache]:
    if request.param == "memory":
        yield MemoryCache()
        return
    redis_cache = RedisCache(Redis.from_url(REDIS_URL), KEYRING, request.getfixturevalue("prefix"))
    yield redis_cache
    await redis_cache.close()


def jwt(lifetime: float, name: str = "jwt") -> CachedJwt:
    return CachedJwt(f"{name}-{uuid.uuid4().hex}", time.time() + lifetime)


class TestBothBackends:
    async def test_put_then_get_returns_the_jwt_for_that_version_only(
        self, cache: TokenCache
    ) -> None:
        cid, token = uuid.uuid4(), jwt(3600)
        assert await cache.put(cid, 1, token, 60)
        assert await cache.get(cid, 1) == token
        assert await cache.get(cid, 2) is None
        assert await cache.get(uuid.uuid4(), 1) is None
        assert await cache.expires_at(cid, 1) == pytest.approx(token.expires_at)

    async def test_a_shorter_lived_jwt_never_replaces_a_longer_lived_one(
        self, cache: TokenCache
    ) -> None:
        cid, newer, older = uuid.uuid4(), jwt(3600, "newer"), jwt(1800, "older")
        assert await cache.put(cid, 1, newer, 60)
        assert not await cache.put(cid, 1, older, 60)
        assert await cache.get(cid, 1) == newer
        longest = jwt(7200, "longest")
        assert await cache.put(cid, 1, longest, 60)
        assert await cache.get(cid, 1) == longest

    async def test_entries_vanish_after_their_ttl(self, cache: TokenCache) -> None:
        cid = uuid.uuid4()
        await cache.put(cid, 1, jwt(3600), 0.2)
        assert await cache.get(cid, 1) is not None
        await asyncio.sleep(0.3)
        assert await cache.get(cid, 1) is None
        assert not await cache.put(cid, 1, jwt(3600), 0)

    async def test_purge_removes_the_entry(self, cache: TokenCache) -> None:
        cid = uuid.uuid4()
        await cache.put(cid, 3, jwt(3600), 60)
        await cache.purge(cid, 3)
        assert await cache.get(cid, 3) is None
        assert await cache.expires_at(cid, 3) is None

    async def test_lock_has_one_owner_and_only_the_owner_releases_it(
        self, cache: TokenCache
    ) -> None:
        cid = uuid.uuid4()
        owner = await cache.try_lock(cid, 5)
        assert owner is not None
        assert await cache.try_lock(cid, 5) is None
        await cache.unlock(cid, "someone-else")
        assert await cache.try_lock(cid, 5) is None
        await cache.unlock(cid, owner)
        assert await cache.try_lock(cid, 5) is not None

    async def test_a_lock_whose_owner_died_expires(self, cache: TokenCache) -> None:
        cid = uuid.uuid4()
        assert await cache.try_lock(cid, 0.1) is not None
        await asyncio.sleep(0.2)
        assert await cache.try_lock(cid, 5) is not None


class TestRedisLayout:
    async def test_entry_is_sealed_hash_tagged_and_expires_before_the_jwt(
        self, redis: Redis, prefix: str
    ) -> None:
        cache, cid, token = RedisCache(redis, KEYRING, prefix), uuid.uuid4(), jwt(3600)
        margin = 60
        await cache.put(cid, 7, token, token.expires_at - margin - time.time())

        key = f"{prefix}{{cred:{cid}}}:jwt:7"
        raw = await redis.hgetall(key)
        assert set(raw) == {b"exp", b"k", b"v"}
        assert token.access_token.encode() not in b"".join(raw.values())
        assert raw[b"k"] == b"cache"
        pttl = await redis.pttl(key)
        assert 0 < pttl <= (token.expires_at - margin - time.time()) * 1000 + 50
        score = await redis.zscore(f"{prefix}expiry", f"{cid}:7")
        assert score == pytest.approx(token.expires_at)

    async def test_a_sealed_value_copied_to_another_key_does_not_open(
        self, redis: Redis, prefix: str
    ) -> None:
        cache, a, b = RedisCache(redis, KEYRING, prefix), uuid.uuid4(), uuid.uuid4()
        await cache.put(a, 1, jwt(3600), 60)
        await cache.put(b, 1, jwt(3600), 60)
        stolen = await redis.hget(cache.entry_key(a, 1), "v")
        assert stolen is not None
        await redis.hset(cache.entry_key(b, 1), "v", stolen)
        assert await cache.get(b, 1) is None

    async def test_lock_key_shares_the_entry_hash_tag(self, redis: Redis, prefix: str) -> None:
        cache, cid = RedisCache(redis, KEYRING, prefix), uuid.uuid4()
        tag = f"{{cred:{cid}}}"
        assert tag in cache.lock_key(cid)
        assert tag in cache.entry_key(cid, 1)

    async def test_purge_drops_the_index_member(self, redis: Redis, prefix: str) -> None:
        cache, cid = RedisCache(redis, KEYRING, prefix), uuid.uuid4()
        await cache.put(cid, 1, jwt(3600), 60)
        await cache.purge(cid, 1)
        assert await redis.zscore(f"{prefix}expiry", f"{cid}:1") is None


async def test_vends_are_shipped_to_redis_once_per_resolution(redis: Redis, prefix: str) -> None:
    """The refresher only asks "vended within the window?": a credential vended again soon after
    it was shipped is not shipped again until `resolution` has passed."""
    shared = RedisCache(redis, KEYRING, prefix)
    cache = TieredCache(shared, Invalidation(redis, f"{prefix}generation"))
    cid = uuid.uuid4()

    cache.note_vended(cid)
    await cache.flush_vended(resolution=60)
    first = await shared.last_vended(cid)
    assert first is not None

    await asyncio.sleep(0.05)
    cache.note_vended(cid)
    await cache.flush_vended(resolution=60)
    assert await shared.last_vended(cid) == first  # within the resolution: not sent again

    cache.note_vended(cid)
    await cache.flush_vended()  # no resolution: every vend is shipped
    later = await shared.last_vended(cid)
    assert later is not None
    assert later > first
