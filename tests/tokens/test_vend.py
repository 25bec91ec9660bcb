from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt as jose_jwt
from redis.asyncio import Redis
from sqlalchemy import event, update
from sqlalchemy.engine import Engine

from app.credentials.models import Credential, CredentialStatus
from app.integrations.phrase.dev_idm import DevIdmMode
from app.main import create_app
from tests.conftest import Api, Env


async def vend(
    http: httpx.AsyncClient, headers: dict[str, str], team: str = "acme", **params: object
) -> httpx.Response:
    return await http.get(f"/v1/teams/{team}/token", params=params, headers=headers)


class TestVendToken:
    async def test_first_request_exchanges_and_the_second_is_served_from_cache(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])

        first = await vend(http, client)
        second = await vend(http, client)

        assert first.status_code == 200, first.text
        assert second.status_code == 200
        assert first.json()["cache"] == "miss"
        assert second.json()["cache"] == "hit"
        assert first.json()["access_token"] == second.json()["access_token"]
        assert env.idm.exchanges == 1

    async def test_response_shape_and_no_store_headers(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])

        r = await vend(http, client)

        assert r.headers["cache-control"] == "no-store"
        assert r.headers["pragma"] == "no-cache"
        body = r.json()
        assert set(body) == {
            "access_token",
            "token_type",
            "issued_token_type",
            "expires_in",
            "expires_at",
            "team",
            "credential",
            "region",
            "cache",
        }
        assert body["token_type"] == "Bearer"
        assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
        assert (body["team"], body["credential"], body["region"]) == ("acme", "default", "eu")
        claims = jose_jwt.get_unverified_claims(body["access_token"])
        assert 14399 - 5 <= body["expires_in"] <= 14399
        assert abs(claims["exp"] - (time.time() + body["expires_in"])) <= 2

    async def test_min_ttl_longer_than_the_cached_jwt_forces_a_new_exchange(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(DevIdmMode(expires_in=900))
        short = await vend(http, client, min_ttl=0)
        assert short.json()["expires_in"] <= 900

        env.idm.set_mode(DevIdmMode())
        longer = await vend(http, client, min_ttl=1800)

        assert longer.status_code == 200
        assert longer.json()["cache"] == "miss"
        assert longer.json()["expires_in"] > 1800
        assert env.idm.exchanges == 2
        again = await vend(http, client, min_ttl=1800)
        assert again.json()["cache"] == "hit"

    async def test_a_fresh_jwt_shorter_than_min_ttl_is_refused_not_served(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(DevIdmMode(expires_in=200))

        r = await vend(http, client, min_ttl=600)

        assert r.status_code == 502
        assert r.json()["code"] == "upstream-lifetime-too-short"

    async def test_jwt_expiring_within_the_margin_is_not_cached(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(DevIdmMode(expires_in=env.settings.expiry_margin_seconds - 10))

        for _ in range(2):
            r = await vend(http, client, min_ttl=0)
            assert r.status_code == 200
            assert r.json()["cache"] == "miss"
        assert env.idm.exchanges == 2

    async def test_rotation_purges_the_cached_jwt(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        before = (await vend(http, client)).json()["access_token"]

        r = await http.put(
            "/v1/teams/acme/credentials/default/api-token",
            json={"api_token": "phrdev_rotated_token_0001"},
            headers=api.admin,
        )
        assert r.status_code == 200
        assert r.json()["version"] == 2
        assert r.json()["jwt_cached"] is False

        after = await vend(http, client)
        assert after.json()["cache"] == "miss"
        assert after.json()["access_token"] != before
        assert env.idm.exchanges == 2

    async def test_deleted_credential_is_not_served_and_its_entry_is_gone(
        self, http: httpx.AsyncClient, api: Api, env: Env, app: FastAPI
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        assert (await vend(http, client)).status_code == 200

        assert (
            await http.delete("/v1/teams/acme/credentials/default", headers=api.admin)
        ).status_code == 204

        r = await vend(http, client)
        assert r.status_code == 404
        assert r.json()["code"] == "credential-not-found"
        await assert_no_cached_entries(env)

    async def test_team_deletion_purges_its_credentials_jwts(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        await api.credential(name="second")
        _, client = await api.client(["acme"])
        assert (await vend(http, client)).status_code == 200
        assert (await vend(http, client, credential="second")).status_code == 200

        assert (await http.delete("/v1/teams/acme", headers=api.admin)).status_code == 204

        assert (await vend(http, client)).json()["code"] == "team-not-found"
        await assert_no_cached_entries(env)

    async def test_eviction_makes_the_next_request_exchange(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        await vend(http, client)

        r = await http.delete("/v1/teams/acme/token", headers=api.admin)
        assert r.status_code == 200
        assert r.json()["evicted"] is True
        again = await http.delete("/v1/teams/acme/token", headers=api.admin)
        assert again.json()["evicted"] is False

        assert (await vend(http, client)).json()["cache"] == "miss"
        assert env.idm.exchanges == 2

    async def test_eviction_needs_admin(self, http: httpx.AsyncClient, api: Api) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        r = await http.delete("/v1/teams/acme/token", headers=client)
        assert r.status_code == 403


class TestConcurrency:
    async def test_200_concurrent_requests_for_a_cold_credential_cause_one_exchange(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(DevIdmMode(delay_ms=200))

        responses = await asyncio.gather(*(vend(http, client) for _ in range(200)))

        assert [r.status_code for r in responses] == [200] * 200
        assert len({r.json()["access_token"] for r in responses}) == 1
        assert env.idm.exchanges == 1
        assert env.idm.requests == 1

    async def test_a_burst_for_many_cold_credentials_reads_and_stamps_them_in_batches(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        """A transaction per cold credential (to find it, then to note its exchange) would drain
        the connection pool in a burst; concurrent ones share a query instead."""
        teams = [f"team-{i}" for i in range(40)]
        for team in teams:
            await api.team(team)
            await api.credential(team)
        _, client = await api.client(teams)
        env.idm.set_mode(DevIdmMode(delay_ms=50))
        statements: list[str] = []

        def note(conn: object, cursor: object, statement: str, *args: object) -> None:
            statements.append(" ".join(statement.split()).lower())

        event.listen(Engine, "before_cursor_execute", note)
        try:
            responses = await asyncio.gather(*(vend(http, client, t) for t in teams * 3))
        finally:
            event.remove(Engine, "before_cursor_execute", note)

        assert [r.status_code for r in responses] == [200] * 120
        assert env.idm.exchanges == 40
        lookups = [s for s in statements if s.startswith("select") and "credentials" in s]
        stamps = [s for s in statements if s.startswith("update credentials")]
        assert 0 < len(lookups) <= 10, lookups
        assert 0 < len(stamps) <= 20, stamps  # two statements a batch
        for team in teams:
            r = await http.get(f"/v1/teams/{team}/credentials/default", headers=api.admin)
            assert r.json()["last_exchange_at"] is not None, team

    async def test_two_exchanges_noted_in_one_batch_report_one_recovery(
        self, app: FastAPI, api: Api
    ) -> None:
        """Two exchanges of a rejected credential whose notes share a batch: it recovers once."""
        await api.team()
        await api.credential()
        infra = app.state.infra
        cred = await infra.directory.find("acme", "default")
        async with infra.sessionmaker() as session, session.begin():
            await session.execute(
                update(Credential)
                .where(Credential.id == cred.id)
                .values(status=CredentialStatus.REJECTED, last_error_code="invalid_grant")
            )
        events: list[str] = []
        infra.broker._on_status_change = lambda _cred, event, _code: events.append(event)

        await asyncio.gather(*(infra.broker._record(cred, rejected=None) for _ in range(3)))

        assert events == ["credential.recovered"]
        r = await api.http.get("/v1/teams/acme/credentials/default", headers=api.admin)
        assert r.json()["status"] == "active"
        assert r.json()["last_exchange_at"] is not None

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_two_app_instances_sharing_a_cache_exchange_once(
        self, env: Env, api: Api, http: httpx.AsyncClient
    ) -> None:
        """Two replicas (two app instances, two broker maps) racing for one cold credential."""

        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(DevIdmMode(delay_ms=300))
        other = create_app(env.settings)
        async with other.router.lifespan_context(other):
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica-2") as http2:
                responses = await asyncio.gather(
                    *(vend(h, client) for _ in range(50) for h in (http, http2))
                )
        assert [r.status_code for r in responses] == [200] * 100
        assert len({r.json()["access_token"] for r in responses}) == 1
        assert env.idm.exchanges == 1


class TestUpstreamFailures:
    async def test_invalid_grant_is_424_and_marks_the_credential_rejected(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential(api_token="not-a-known-phrase-token")
        _, client = await api.client(["acme"])

        r = await vend(http, client)

        assert r.status_code == 424
        assert r.json()["code"] == "credential-rejected"
        view = (await http.get("/v1/teams/acme/credentials/default", headers=api.admin)).json()
        assert view["status"] == "rejected"
        assert view["last_error"]["code"] == "invalid_grant"

    async def test_a_rejected_credential_is_not_retried_upstream_until_rotated(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential(api_token="not-a-known-phrase-token")
        _, client = await api.client(["acme"])
        await vend(http, client)

        for _ in range(5):
            assert (await vend(http, client)).status_code == 424
        assert env.idm.requests == 1

        await http.put(
            "/v1/teams/acme/credentials/default/api-token",
            json={"api_token": "phrdev_the_good_one_0001"},
            headers=api.admin,
        )
        r = await vend(http, client)
        assert r.status_code == 200
        view = (await http.get("/v1/teams/acme/credentials/default", headers=api.admin)).json()
        assert view["status"] == "active"
        assert view["last_error"] is None

    @pytest.mark.parametrize(
        ("mode", "status", "code"),
        [
            (DevIdmMode(fail_status=503), 503, "upstream-unavailable"),
            (DevIdmMode(fail_status=429, retry_after=7), 503, "upstream-unavailable"),
            (DevIdmMode(garbage="html"), 502, "upstream-bad-response"),
            (DevIdmMode(garbage="missing-fields"), 502, "upstream-bad-response"),
        ],
    )
    async def test_upstream_failures_map_to_problems_and_cache_nothing(
        self, http: httpx.AsyncClient, api: Api, env: Env, mode: DevIdmMode, status: int, code: str
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        env.idm.set_mode(mode)

        r = await vend(http, client)

        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == code
        if status == 503:
            assert int(r.headers["retry-after"]) >= 1
        env.idm.set_mode(DevIdmMode())
        assert (await vend(http, client)).json()["cache"] == "miss"

    async def test_a_cached_jwt_is_served_while_the_upstream_fails(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        first = await vend(http, client)
        env.idm.set_mode(DevIdmMode(fail_status=500))

        r = await vend(http, client)

        assert r.status_code == 200
        assert r.json()["access_token"] == first.json()["access_token"]


async def assert_no_cached_entries(env: Env) -> None:
    if env.settings.redis_url is None:
        return
    redis = Redis.from_url(env.settings.redis_url.get_secret_value())
    try:
        keys = [k async for k in redis.scan_iter(match=f"{env.settings.redis_prefix}*jwt*")]
        members = await redis.zrange(f"{env.settings.redis_prefix}expiry", 0, -1)
    finally:
        await redis.aclose()
    assert keys == []
    assert members == []
