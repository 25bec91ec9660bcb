from __future__ import annotations

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.credentials.models import Credential
from tests.auth.test_access import assert_problem
from tests.conftest import Api, Env


class TestCredentials:
    async def test_create_returns_the_view_without_the_secret(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        token = "phrdev_secret_value_wxyz"
        r = await http.post(
            "/v1/teams/acme/credentials",
            json={
                "region": "us",
                "api_token": token,
                "product": "strings",
                "expires_on": "2028-11-29",
            },
            headers=api.admin,
        )
        assert r.status_code == 201
        body = r.json()
        assert token not in r.text
        assert body["name"] == "default"
        assert body["region"] == "us"
        assert body["api_token_hint"] == "wxyz"
        assert body["status"] == "active"
        assert body["version"] == 1
        assert body["jwt_cached"] is False
        assert body["expires_on"] == "2028-11-29"

    async def test_the_database_holds_only_ciphertext_bound_to_the_row(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        token = await api.credential()
        engine = create_async_engine(env.settings.database_url.get_secret_value())
        async with engine.connect() as conn:
            row = (await conn.execute(select(Credential.__table__))).mappings().one()
        await engine.dispose()
        assert token.encode() not in bytes(row["api_token_ciphertext"])
        assert row["api_token_key_id"] == "test"
        plain = env.settings.keyring.open(
            __import__("app.core.crypto", fromlist=["Sealed"]).Sealed(
                row["api_token_key_id"], bytes(row["api_token_ciphertext"])
            ),
            f"tokenvend:credential:{row['id']}:api_token".encode(),
        )
        assert plain.decode() == token

    async def test_duplicate_name_is_409_and_other_names_are_fine(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        r = await http.post(
            "/v1/teams/acme/credentials",
            json={"region": "eu", "api_token": "phrdev_another_token_1"},
            headers=api.admin,
        )
        assert_problem(r, 409, "credential-exists")
        await api.credential(name="tms")
        listed = (await http.get("/v1/teams/acme/credentials", headers=api.admin)).json()
        assert [c["name"] for c in listed["items"]] == ["default", "tms"]

    async def test_missing_team_and_credential_are_404(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        assert_problem(
            await http.get("/v1/teams/ghost/credentials", headers=api.admin), 404, "team-not-found"
        )
        await api.team()
        r = await http.get("/v1/teams/acme/credentials/ghost", headers=api.admin)
        assert_problem(r, 404, "credential-not-found")

    @pytest.mark.parametrize(
        "body",
        [
            {"region": "asia", "api_token": "phrdev_long_enough_1"},
            {"region": "eu", "api_token": "tiny-tok"},
            {"region": "eu", "api_token": "x" * 5000},
            {"region": "eu"},
            {"region": "eu", "api_token": "phrdev_long_enough_1", "name": "Bad Name"},
        ],
    )
    async def test_bad_bodies_are_422_and_never_echo_the_token(
        self, http: httpx.AsyncClient, api: Api, body: dict[str, str]
    ) -> None:
        await api.team()
        r = await http.post("/v1/teams/acme/credentials", json=body, headers=api.admin)
        assert_problem(r, 422, "validation-failed")
        if "api_token" in body:
            assert body["api_token"] not in r.text

    async def test_view_shows_the_cached_jwt_and_its_expiry(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        vended = (await http.get("/v1/teams/acme/token", headers=client)).json()

        view = (await http.get("/v1/teams/acme/credentials/default", headers=api.admin)).json()

        assert view["jwt_cached"] is True
        assert view["jwt_expires_at"][:19] == vended["expires_at"][:19]
        assert view["last_exchange_at"] is not None

    async def test_disabling_stops_vending_and_enabling_resumes(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["acme"])
        r = await http.patch(
            "/v1/teams/acme/credentials/default", json={"status": "disabled"}, headers=api.admin
        )
        assert r.json()["status"] == "disabled"
        assert_problem(
            await http.get("/v1/teams/acme/token", headers=client), 409, "credential-disabled"
        )
        assert env.idm.requests == 0

        await http.patch(
            "/v1/teams/acme/credentials/default", json={"status": "active"}, headers=api.admin
        )
        assert (await http.get("/v1/teams/acme/token", headers=client)).status_code == 200

    async def test_status_rejected_cannot_be_set_by_hand(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        r = await http.patch(
            "/v1/teams/acme/credentials/default", json={"status": "rejected"}, headers=api.admin
        )
        assert_problem(r, 422, "validation-failed")

    async def test_changes_are_audited_without_secrets(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        token = await api.credential()
        await http.put(
            "/v1/teams/acme/credentials/default/api-token",
            json={"api_token": "phrdev_rotated_secret_1"},
            headers=api.admin,
        )
        await http.delete("/v1/teams/acme/credentials/default", headers=api.admin)
        r = await http.get("/v1/audit-events", params={"team": "acme"}, headers=api.admin)
        actions = [e["action"] for e in r.json()["items"]]
        assert actions == [
            "credential.delete",
            "credential.rotate",
            "credential.create",
            "team.create",
        ]
        assert token not in r.text
        assert "phrdev_rotated_secret_1" not in r.text
