from __future__ import annotations

import httpx
import pytest

from tests.auth.test_access import assert_problem
from tests.conftest import Api


class TestClients:
    async def test_create_shows_the_key_once(self, http: httpx.AsyncClient, api: Api) -> None:
        r = await http.post(
            "/v1/clients", json={"name": "billing", "teams": ["b", "a", "a"]}, headers=api.admin
        )
        assert r.status_code == 201
        body = r.json()
        assert body["api_key"].startswith(f"tvk_{body['client']['key_id']}_")
        assert body["client"]["role"] == "client"
        assert body["client"]["teams"] == ["a", "b"]

        got = await http.get(f"/v1/clients/{body['client']['id']}", headers=api.admin)
        assert body["api_key"] not in got.text
        listed = await http.get("/v1/clients", headers=api.admin)
        assert body["api_key"] not in listed.text
        assert body["client"]["id"] in listed.text

    async def test_wildcard_swallows_other_grants(self, http: httpx.AsyncClient, api: Api) -> None:
        r = await http.post(
            "/v1/clients", json={"name": "x", "teams": ["a", "*"]}, headers=api.admin
        )
        assert r.json()["client"]["teams"] == ["*"]

    @pytest.mark.parametrize(
        "body",
        [
            {"name": ""},
            {"name": "x", "role": "root"},
            {"name": "x", "teams": ["Bad"]},
            {"name": "x", "teams": ["a"] * 101},
        ],
    )
    async def test_bad_bodies_are_422(
        self, http: httpx.AsyncClient, api: Api, body: dict[str, object]
    ) -> None:
        assert_problem(
            await http.post("/v1/clients", json=body, headers=api.admin), 422, "validation-failed"
        )

    async def test_missing_client_is_404_and_bad_id_is_422(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        missing = "/v1/clients/00000000-0000-0000-0000-000000000000"
        assert_problem(await http.get(missing, headers=api.admin), 404, "client-not-found")
        assert_problem(
            await http.get("/v1/clients/not-a-uuid", headers=api.admin), 422, "validation-failed"
        )

    async def test_regrant_takes_effect_on_the_next_request(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team("acme")
        await api.credential("acme")
        client_id, key = await api.client(["other"])
        assert (await http.get("/v1/teams/acme/token", headers=key)).status_code == 403
        await http.patch(f"/v1/clients/{client_id}", json={"teams": ["acme"]}, headers=api.admin)
        assert (await http.get("/v1/teams/acme/token", headers=key)).status_code == 200

    async def test_a_client_promoted_to_admin_reaches_admin_routes(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        client_id, key = await api.client([])
        assert (await http.get("/v1/teams", headers=key)).status_code == 403
        await http.patch(f"/v1/clients/{client_id}", json={"role": "admin"}, headers=api.admin)
        assert (await http.get("/v1/teams", headers=key)).status_code == 200

    async def test_changes_are_audited(self, http: httpx.AsyncClient, api: Api) -> None:
        client_id, _ = await api.client([])
        await http.post(f"/v1/clients/{client_id}/rotate-key", headers=api.admin)
        await http.delete(f"/v1/clients/{client_id}", headers=api.admin)
        r = await http.get("/v1/audit-events", headers=api.admin)
        actions = [e["action"] for e in r.json()["items"] if e["action"].startswith("client.")]
        assert actions == ["client.delete", "client.rotate-key", "client.create"]
