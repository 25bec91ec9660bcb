"""Proactive refresh: JWTs in use are exchanged anew before they expire, by one leader."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.core.config import Settings
from app.core.lifespan import Infra
from app.integrations.phrase.dev_idm import DevIdm
from app.main import create_app
from app.tokens.cache import CachedJwt, MemoryCache, RedisCache
from app.tokens.refresher import Refresher
from tests.conftest import Api, Env, make_settings

# A 6 s JWT with a 1 s margin, refreshed at half its life (no jitter), ticks every 0.2 s: the
# refresh falls due ~3 s after the exchange and the entry would leave the cache ~5 s after it.
LIFETIME = 6
REFRESHING: dict[str, Any] = {
    "expiry_margin_seconds": 1,
    "default_min_ttl_seconds": 1,
    "refresh_fraction": 0.5,
    "refresh_jitter": 0.0,
    "refresh_interval_seconds": 0.2,
}
# The app's own refresher kept out of the way, for tests that drive a Refresher by hand.
IDLE: dict[str, Any] = {**REFRESHING, "refresh_interval_seconds": 300.0}


def tuned(env: Env, **overrides: Any) -> Settings:
    return make_settings(**{**env.settings.model_dump(), **overrides})


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenvend.test") as http:
            yield app, http


def infra_of(app: FastAPI) -> Infra:
    infra: Infra = app.state.infra
    return infra


async def vend(
    http: httpx.AsyncClient, headers: dict[str, str], **params: str | int
) -> httpx.Response:
    r = await http.get("/v1/teams/acme/token", params=params, headers=headers)
    assert r.status_code == 200, r.text
    return r


async def setup_team(http: httpx.AsyncClient, admin_key: str) -> dict[str, str]:
    api = Api(http, admin_key)
    await api.team()
    await api.credential()
    _, client = await api.client(["acme"])
    return client


async def wait_for(condition: Callable[[], bool], within: float) -> float:
    """Poll `condition()` until it holds; the seconds it took. Fails after `within` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "condition not met in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class TestProactiveRefresh:
    async def test_a_vended_jwt_is_replaced_before_it_expires_without_a_client_request(
        self, env: Env, idm: DevIdm
    ) -> None:
        idm.set_mode(expires_in=LIFETIME)
        async with running(tuned(env, **REFRESHING)) as (app, http):
            infra = infra_of(app)
            client = await setup_team(http, env.admin_key)
            first = (await vend(http, client)).json()
            exchanged_at = time.time()
            assert first["cache"] == "miss"
            cred = await infra.directory.find("acme", "default")

            # Wait for the cache to hold another JWT (the IdM counts an exchange on arrival,
            # before the app has the answer).
            while True:
                cached = await infra.cache.get_shared(cred.id, cred.version)
                assert cached is not None, "the entry left the cache before it was refreshed"
                if cached.access_token != first["access_token"]:
                    break
                assert time.time() - exchanged_at < LIFETIME
                await asyncio.sleep(0.05)

            refreshed_after = time.time() - exchanged_at
            # Due at half the life (3 s of 6; the `exp` claim can make it up to 1 s shorter),
            # and in any case before the entry would have left the cache (life - margin).
            assert 1.5 < refreshed_after < LIFETIME - 1, refreshed_after
            assert idm.exchanges == 2
            second = (await vend(http, client)).json()
            assert second["cache"] == "hit"
            assert second["access_token"] == cached.access_token
            assert second["expires_in"] > first["expires_in"] - 1
            assert idm.exchanges == 2  # the hit caused no exchange

    async def test_a_credential_not_vended_within_the_window_is_not_refreshed(
        self, env: Env, idm: DevIdm
    ) -> None:
        idm.set_mode(expires_in=LIFETIME)
        async with running(tuned(env, **IDLE)) as (app, http):
            infra = infra_of(app)
            client = await setup_team(http, env.admin_key)
            await vend(http, client)  # noted as vended (flushed below)
            cred = await infra.directory.find("acme", "default")
            # A refresher like the app's, with a window of half a second instead of the
            # minimum the settings allow (60 s).
            refresher = Refresher(
                broker=infra.broker,
                cache=infra.cache,
                directory=infra.directory,
                redis=None,
                prefix=env.settings.redis_prefix,
                interval=0.2,
                window=0.5,
            )
            await infra.cache.flush_vended()
            await asyncio.sleep(0.6)
            await infra.cache.schedule_refresh(cred.id, cred.version, time.time())  # due now

            assert await refresher.tick() == 0

            assert idm.exchanges == 1
            assert await infra.cache.due_refreshes(float("inf"), 10) == []  # let it expire
            # The contrast: vended again, within the window, the same tick refreshes it.
            await vend(http, client)
            await infra.cache.flush_vended()
            await infra.cache.schedule_refresh(cred.id, cred.version, time.time())
            assert await refresher.tick() == 1
            assert idm.exchanges == 2

    async def test_a_credential_never_vended_is_not_refreshed(self, env: Env, idm: DevIdm) -> None:
        async with running(tuned(env, **IDLE)) as (app, http):
            infra = infra_of(app)
            await setup_team(http, env.admin_key)
            cred = await infra.directory.find("acme", "default")
            await infra.broker.refresh(cred, 0.0)  # cached and scheduled, but nobody asked
            await infra.cache.schedule_refresh(cred.id, cred.version, time.time())

            assert await infra.refresher.tick() == 0
            assert idm.exchanges == 1


class TestLeadership:
    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_one_leader_among_replicas_and_another_takes_over_when_it_stops(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, **REFRESHING)
        first = running(settings)
        app_a, _ = await first.__aenter__()
        first_open = True
        try:
            a = infra_of(app_a).refresher
            await wait_for(lambda: a.leader, within=2)
            async with running(settings) as (app_b, _):
                b = infra_of(app_b).refresher
                for _ in range(10):  # two seconds of ticks: never two leaders
                    await asyncio.sleep(0.2)
                    assert (a.leader, b.leader) == (True, False)

                first_open = False
                await first.__aexit__(None, None, None)  # the leader's app shuts down
                stopped_at = time.monotonic()
                took = await wait_for(lambda: b.leader, within=5)

                assert not a.leader
                # The lease is 3 s; a leader that shut down resigned it, so the next tick wins.
                assert took < 1.0, took
                assert time.monotonic() - stopped_at < 3.0
        finally:
            if first_open:
                await first.__aexit__(None, None, None)

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_a_leader_that_dies_without_resigning_is_replaced_within_the_lease(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, **REFRESHING)
        async with running(settings) as (app_a, _), running(settings) as (app_b, _):
            a, b = infra_of(app_a).refresher, infra_of(app_b).refresher
            await wait_for(lambda: a.leader != b.leader, within=2)
            leader, follower = (a, b) if a.leader else (b, a)
            task = leader._task
            assert task is not None
            # A frozen or killed replica: it stops renewing and never resigns. Cancelled until it
            # has ended: on Python 3.11 a cancellation that lands as a Redis write completes is
            # lost (see Refresher.stop), and the leader would go on renewing its lease.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.05)
            died_at = time.monotonic()

            await wait_for(lambda: follower.leader, within=5)

            took = time.monotonic() - died_at
            assert took < 3.0 + 0.5, took  # the lease (max(3 s, 5 ticks)) plus a tick


def jwt(expires_in: float, name: str) -> CachedJwt:
    return CachedJwt(f"{name}-{uuid.uuid4().hex}", time.time() + expires_in)


class TestNewerWins:
    """An exchange that started earlier but finishes later must not replace a newer JWT."""

    async def test_through_the_tiered_cache(self, app: FastAPI) -> None:
        cache = infra_of(app).cache
        cid = uuid.uuid4()
        newer, older = jwt(3600, "newer"), jwt(1800, "older")

        assert await cache.put(cid, 1, newer, 3000)
        assert not await cache.put(cid, 1, older, 1500)

        assert await cache.get(cid, 1) == newer
        assert await cache.get_shared(cid, 1) == newer
        assert await cache.expires_at(cid, 1) == newer.expires_at

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_an_older_jwt_from_another_replica_does_not_shadow_the_shared_newer_one(
        self, app: FastAPI, env: Env
    ) -> None:
        """Replica 2 stores the newer JWT; replica 1's slower exchange finishes after it."""
        other = create_app(env.settings)
        async with other.router.lifespan_context(other):
            mine, theirs = infra_of(app).cache, infra_of(other).cache
            cid = uuid.uuid4()
            newer, older = jwt(3600, "newer"), jwt(1800, "older")
            assert await theirs.put(cid, 1, newer, 3000)

            stored = await mine.put(cid, 1, older, 1500)

            assert not stored
            assert await mine.get(cid, 1) == newer  # not the older one from its own L1
            assert await theirs.get(cid, 1) == newer

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_in_redis_the_entry_ttl_and_expiry_index_keep_the_newer_jwt(
        self, app: FastAPI
    ) -> None:
        shared = infra_of(app).cache.shared
        assert isinstance(shared, RedisCache)
        cid = uuid.uuid4()
        newer, older = jwt(3600, "newer"), jwt(1800, "older")
        assert await shared.put(cid, 1, newer, 3000)

        assert not await shared.put(cid, 1, older, 1500)

        assert await shared.get(cid, 1) == newer
        assert 2990 < await shared.ttl(cid, 1) <= 3000

    async def test_in_memory(self) -> None:
        memory = MemoryCache()
        cid = uuid.uuid4()
        newer, older = jwt(3600, "newer"), jwt(1800, "older")
        assert await memory.put(cid, 1, newer, 3000)

        assert not await memory.put(cid, 1, older, 1500)

        assert await memory.get(cid, 1) == newer
