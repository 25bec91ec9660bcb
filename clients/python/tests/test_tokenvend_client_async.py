"""AsyncTokenVendClient against a real tokenvend (SQLite, in-process cache, development IdM)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import TEAM, Tokenvend
from tokenvend_client import AsyncTokenVendClient, Forbidden, Unauthorized, Unavailable


@pytest.fixture
def tv(tokenvend: Tokenvend, async_http: httpx.AsyncClient) -> AsyncTokenVendClient:
    return AsyncTokenVendClient(tokenvend.url, tokenvend.client_key, http=async_http)


async def test_returns_a_jwt_and_serves_the_second_call_from_the_local_cache(
    tv: AsyncTokenVendClient, tokenvend: Tokenvend
) -> None:
    first = await tv.token(TEAM)
    second = await tv.token(TEAM)

    assert second is first
    assert first.access_token.count(".") == 2
    assert first.cache == "miss"
    assert len(tokenvend.token_requests()) == 1
    assert tokenvend.idm.exchanges == 1


async def test_min_ttl_beyond_the_cached_life_asks_tokenvend_again(
    tv: AsyncTokenVendClient, tokenvend: Tokenvend
) -> None:
    tokenvend.idm.set_mode(expires_in=600)
    short = await tv.token(TEAM)
    tokenvend.idm.set_mode(expires_in=14399)

    longer = await tv.token(TEAM, min_ttl=1200)

    assert longer.access_token != short.access_token
    assert len(tokenvend.token_requests()) == 2
    assert tokenvend.idm.exchanges == 2


async def test_50_tasks_on_a_cold_team_cause_one_request(
    tv: AsyncTokenVendClient, tokenvend: Tokenvend
) -> None:
    tokenvend.idm.set_mode(delay_ms=200)

    tokens = await asyncio.gather(*(tv.token(TEAM) for _ in range(50)))

    assert len({t.access_token for t in tokens}) == 1
    assert len(tokenvend.token_requests()) == 1
    assert tokenvend.idm.exchanges == 1


async def test_tasks_waiting_on_a_failed_request_share_its_error(
    tv: AsyncTokenVendClient, tokenvend: Tokenvend
) -> None:
    tokenvend.idm.set_mode(delay_ms=200, fail_status=503)

    results = await asyncio.gather(*(tv.token(TEAM) for _ in range(50)), return_exceptions=True)

    assert all(isinstance(r, Unavailable) and r.status == 503 for r in results)
    assert len(tokenvend.token_requests()) == 1


async def test_a_cancelled_request_leaves_the_waiters_to_ask_again(
    tv: AsyncTokenVendClient, tokenvend: Tokenvend
) -> None:
    tokenvend.idm.set_mode(delay_ms=300)
    leader = asyncio.create_task(tv.token(TEAM))
    await asyncio.sleep(0.05)  # the leader's request is in flight
    follower = asyncio.create_task(tv.token(TEAM))
    await asyncio.sleep(0.05)
    leader.cancel()

    token = await follower

    assert token.access_token.count(".") == 2
    assert len(tokenvend.token_requests()) == 2
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_ungranted_team_is_forbidden(tv: AsyncTokenVendClient, tokenvend: Tokenvend) -> None:
    tokenvend.add_team("other")
    with pytest.raises(Forbidden) as caught:
        await tv.token("other")
    assert caught.value.code == "team-not-granted"
    assert tokenvend.client_key not in str(caught.value) + repr(caught.value)


async def test_bad_key_is_unauthorized(tokenvend: Tokenvend) -> None:
    key = tokenvend.client_key[:-4] + "AAAA"
    async with AsyncTokenVendClient(tokenvend.url, key) as tv:
        with pytest.raises(Unauthorized) as caught:
            await tv.token(TEAM)
    assert caught.value.code == "unauthenticated"
    assert key not in str(caught.value) + repr(caught.value) + repr(tv)
