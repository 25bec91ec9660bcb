"""Rate limits per client key: beyond the configured rate a client gets 429 `rate-limited` with an
honest `Retry-After`; an admin can set a client's own rate; the budget is shared by every replica
through Redis, and each process enforces it alone when Redis is unreachable.

The service here allows 0.5 requests per second with bursts of 3: a burst of requests gets exactly
three through (the fourth would be 2 s early), whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import update

from app.clients.models import Client
from app.core.config import Settings
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX
from tests.conftest import Env
from tests.security import serving
from tests.support.processes import free_port

RATE = 0.5
BURST = 3
TOKEN_URL = "/v1/teams/acme/token"


def limited(settings: Settings, **overrides: object) -> Settings:
    # model_copy does not validate: overrides must have the field's type already.
    return settings.model_copy(
        update={"rate_limit_per_second": RATE, "rate_limit_burst": BURST, **overrides}
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def exempt_admin(app: FastAPI, admin_key: str) -> dict[str, str]:
    """The admin sets the scene with many calls: give it a rate of its own (as any admin could
    with PATCH, were it not limited itself)."""
    key_id = admin_key.split("_", 2)[1]
    async with app.state.infra.sessionmaker() as session, session.begin():
        await session.execute(
            update(Client).where(Client.key_id == key_id).values(rate_limit_per_second=100_000)
        )
    return bearer(admin_key)


async def scene(http: httpx.AsyncClient, admin: dict[str, str]) -> None:
    r = await http.post("/v1/teams", json={"slug": "acme"}, headers=admin)
    assert r.status_code == 201, r.text
    body = {"region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"}
    r = await http.post("/v1/teams/acme/credentials", json=body, headers=admin)
    assert r.status_code == 201, r.text


async def new_client(
    http: httpx.AsyncClient, admin: dict[str, str], **fields: object
) -> tuple[str, dict[str, str]]:
    body = {"name": "svc", "teams": ["acme"], **fields}
    r = await http.post("/v1/clients", json=body, headers=admin)
    assert r.status_code == 201, r.text
    return r.json()["client"]["id"], bearer(r.json()["api_key"])


async def burst(http: httpx.AsyncClient, headers: dict[str, str], n: int) -> list[httpx.Response]:
    return [await http.get(TOKEN_URL, headers=headers) for _ in range(n)]


def assert_rate_limited(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert (body["code"], body["status"]) == ("rate-limited", 429)
    assert body["request_id"] == r.headers["x-request-id"]
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= math.ceil(1 / RATE)
    return retry_after


@pytest.fixture
async def limited_app(env: Env) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, dict[str, str]]]:
    async with serving(limited(env.settings)) as (app, http):
        admin = await exempt_admin(app, env.admin_key)
        await scene(http, admin)
        yield app, http, admin


class TestRateLimit:
    async def test_beyond_the_rate_a_client_gets_429_with_an_honest_retry_after(
        self, limited_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]], env: Env
    ) -> None:
        _, http, admin = limited_app
        _, client = await new_client(http, admin)

        answers = await burst(http, client, 8)

        assert [r.status_code for r in answers] == [200] * BURST + [429] * (8 - BURST)
        retry_after = max(assert_rate_limited(r) for r in answers[BURST:])
        assert env.idm.requests == 1  # refused requests never reach the broker
        # The OAuth endpoint spends the same budget.
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": client["Authorization"].removeprefix("Bearer "),
            "subject_token_type": "urn:tokenvend:params:oauth:token-type:client_key",
            "audience": "acme",
        }
        oauth = await http.post("/oauth/token", data=form)
        assert oauth.status_code == 429
        assert oauth.json()["error"] == "temporarily_unavailable"
        assert int(oauth.headers["retry-after"]) >= 1
        # Waiting as told is enough.
        await asyncio.sleep(retry_after)
        assert (await http.get(TOKEN_URL, headers=client)).status_code == 200

    async def test_an_admin_sets_a_clients_own_rate(
        self, limited_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]]
    ) -> None:
        _, http, admin = limited_app
        fast_id, fast = await new_client(http, admin)
        _, normal = await new_client(http, admin)

        # Far above what one caller sends in sequence here (sub-millisecond requests in process).
        r = await http.patch(
            f"/v1/clients/{fast_id}", json={"rate_limit_per_second": 100_000}, headers=admin
        )
        assert r.json()["rate_limit_per_second"] == 100_000

        assert {r.status_code for r in await burst(http, fast, 20)} == {200}
        assert [r.status_code for r in await burst(http, normal, 5)] == [200] * BURST + [429] * 2

        # And back: the client's own rate removed, the service default applies again.
        r = await http.patch(
            f"/v1/clients/{fast_id}", json={"rate_limit_per_second": None}, headers=admin
        )
        assert r.json()["rate_limit_per_second"] is None
        assert 429 in {r.status_code for r in await burst(http, fast, 5)}

    @pytest.mark.parametrize("backend", ["postgres-redis"])
    async def test_the_budget_is_shared_by_every_replica_through_redis(
        self, env: Env, limited_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]]
    ) -> None:
        _, first, admin = limited_app
        _, client = await new_client(first, admin)
        async with serving(limited(env.settings)) as (_, second):
            assert [r.status_code for r in await burst(first, client, BURST)] == [200] * BURST
            # The second replica never saw this client: only Redis can tell it the budget is spent.
            assert_rate_limited(await second.get(TOKEN_URL, headers=client))

    @pytest.mark.parametrize("backend", ["postgres-redis"])
    async def test_each_process_still_limits_when_redis_is_unreachable(self, env: Env) -> None:
        closed = SecretStr(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        async with serving(limited(env.settings, redis_url=closed)) as (app, http):
            admin = await exempt_admin(app, env.admin_key)
            await scene(http, admin)
            _, client = await new_client(http, admin)

            answers = await burst(http, client, 6)

            assert app.state.infra.cache.degraded
        assert [r.status_code for r in answers] == [200] * BURST + [429] * 3
        for r in answers[BURST:]:
            assert_rate_limited(r)


class TestRaisingALimit:
    async def test_raising_a_throttled_clients_rate_takes_effect_on_its_next_request(
        self, limited_app: tuple[FastAPI, httpx.AsyncClient, dict[str, str]]
    ) -> None:
        _, http, admin = limited_app
        client_id, client = await new_client(http, admin)
        assert [r.status_code for r in await burst(http, client, 4)][-1] == 429

        r = await http.patch(
            f"/v1/clients/{client_id}", json={"rate_limit_per_second": 100_000}, headers=admin
        )
        assert r.status_code == 200

        assert (await http.get(TOKEN_URL, headers=client)).status_code == 200
