"""Targeted refresh: callers report a JWT that Phrase refused (`rejected_sha256`), and however many
report the same one, it is exchanged once."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest

from app.integrations.phrase.dev_idm import DevIdmMode
from app.main import create_app
from tests.conftest import Api, Env
from tests.tokens.test_vend import vend


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TestTargetedRefresh:
    async def test_100_reports_of_the_cached_jwt_cause_one_exchange_and_share_its_result(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        refused = (await vend(http, client)).json()["access_token"]

        responses = await asyncio.gather(
            *(vend(http, client, rejected_sha256=sha256(refused)) for _ in range(100))
        )

        assert [r.status_code for r in responses] == [200] * 100, responses[0].text
        tokens = {r.json()["access_token"] for r in responses}
        assert len(tokens) == 1
        assert refused not in tokens
        assert env.idm.exchanges == 2
        # The refused JWT is gone for everybody, not only for those who reported it.
        after = await vend(http, client)
        assert after.json()["access_token"] in tokens
        assert after.json()["cache"] == "hit"

    async def test_a_stale_report_gets_the_current_jwt_without_an_exchange(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        old = (await vend(http, client)).json()["access_token"]
        current = (await vend(http, client, rejected_sha256=sha256(old))).json()["access_token"]
        assert current != old
        assert env.idm.exchanges == 2

        # Upper-case hex is the same hash.
        r = await vend(http, client, rejected_sha256=sha256(old).upper())

        assert r.status_code == 200
        assert r.json()["access_token"] == current
        assert r.json()["cache"] == "hit"
        assert env.idm.exchanges == 2

    @pytest.mark.parametrize(
        "value",
        ["abc", "0" * 63, "0" * 65, "g" * 64, "0" * 62 + " 0", "../" + "0" * 61],
    )
    async def test_a_malformed_hash_is_422_and_exchanges_nothing(
        self, http: httpx.AsyncClient, api: Api, env: Env, value: str
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])

        r = await vend(http, client, rejected_sha256=value)

        assert r.status_code == 422
        assert r.json()["code"] == "validation-failed"
        assert value not in r.text  # 422 bodies never echo the input
        assert env.idm.requests == 0

    async def test_a_report_while_the_upstream_fails_does_not_serve_the_refused_jwt(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        refused = (await vend(http, client)).json()["access_token"]
        env.idm.set_mode(DevIdmMode(fail_status=503))

        r = await vend(http, client, rejected_sha256=sha256(refused))

        assert r.status_code == 503
        assert r.json()["code"] == "upstream-unavailable"
        # Nor is it served to a caller who did not report it: it was purged.
        again = await vend(http, client)
        assert again.status_code == 503

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_a_report_on_one_replica_replaces_the_jwt_on_every_replica(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        refused = (await vend(http, client)).json()["access_token"]
        other = create_app(env.settings)
        async with other.router.lifespan_context(other):
            transport = httpx.ASGITransport(app=other)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica-2") as http2:
                assert (await vend(http2, client)).json()["access_token"] == refused  # in its L1

                new = (await vend(http, client, rejected_sha256=sha256(refused))).json()
                await asyncio.sleep(0.2)  # the invalidation's way through Redis pub/sub

                r = await vend(http2, client)
        assert r.status_code == 200
        assert r.json()["access_token"] == new["access_token"]
        assert env.idm.exchanges == 2
