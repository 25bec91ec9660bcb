from __future__ import annotations

import httpx
import pytest

from tests.auth.test_access import assert_problem
from tests.conftest import Api


class TestTeams:
    async def test_create_get_list_update_delete(self, http: httpx.AsyncClient, api: Api) -> None:
        created = await http.post(
            "/v1/teams", json={"slug": "acme", "name": "ACME"}, headers=api.admin
        )
        assert created.status_code == 201
        assert created.json()["slug"] == "acme"
        assert created.json()["name"] == "ACME"

        assert (await http.get("/v1/teams/acme", headers=api.admin)).json()["name"] == "ACME"
        renamed = await http.patch("/v1/teams/acme", json={"name": "Acme Inc"}, headers=api.admin)
        assert renamed.json()["name"] == "Acme Inc"

        assert (await http.delete("/v1/teams/acme", headers=api.admin)).status_code == 204
        assert_problem(await http.get("/v1/teams/acme", headers=api.admin), 404, "team-not-found")

    async def test_name_defaults_to_the_slug(self, http: httpx.AsyncClient, api: Api) -> None:
        assert (await api.team("solo"))["name"] == "solo"

    async def test_duplicate_slug_is_409(self, http: httpx.AsyncClient, api: Api) -> None:
        await api.team("acme")
        r = await http.post("/v1/teams", json={"slug": "acme"}, headers=api.admin)
        assert_problem(r, 409, "team-exists")

    @pytest.mark.parametrize("slug", ["", "Acme", "-acme", "a" * 64, "acme/x", "ac me", "é"])
    async def test_bad_slugs_are_422(self, http: httpx.AsyncClient, api: Api, slug: str) -> None:
        r = await http.post("/v1/teams", json={"slug": slug}, headers=api.admin)
        assert_problem(r, 422, "validation-failed")
        assert "input" not in r.text  # the input is not echoed

    async def test_unknown_fields_and_bad_json_are_422(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        r = await http.post("/v1/teams", json={"slug": "a", "color": "red"}, headers=api.admin)
        assert_problem(r, 422, "validation-failed")
        r = await http.post(
            "/v1/teams",
            content=b"{not json",
            headers={**api.admin, "content-type": "application/json"},
        )
        assert_problem(r, 422, "validation-failed")

    async def test_list_pages_with_limit_and_offset(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        for slug in ["c", "a", "b"]:
            await api.team(slug)
        first = (await http.get("/v1/teams", params={"limit": 2}, headers=api.admin)).json()
        assert [t["slug"] for t in first["items"]] == ["a", "b"]
        assert first["next_offset"] == 2
        second = (
            await http.get("/v1/teams", params={"limit": 2, "offset": 2}, headers=api.admin)
        ).json()
        assert [t["slug"] for t in second["items"]] == ["c"]
        assert second["next_offset"] is None

    @pytest.mark.parametrize(
        "params", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}]
    )
    async def test_bad_paging_is_422(
        self, http: httpx.AsyncClient, api: Api, params: dict[str, object]
    ) -> None:
        assert_problem(
            await http.get("/v1/teams", params=params, headers=api.admin), 422, "validation-failed"
        )

    async def test_unknown_route_and_method_are_problems(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        assert_problem(await http.get("/v1/nope", headers=api.admin), 404, "not-found")
        assert_problem(await http.put("/v1/teams", headers=api.admin), 405, "method-not-allowed")

    async def test_admin_changes_are_audited(self, http: httpx.AsyncClient, api: Api) -> None:
        await api.team("acme")
        await http.patch("/v1/teams/acme", json={"name": "x"}, headers=api.admin)
        await http.delete("/v1/teams/acme", headers=api.admin)
        r = await http.get("/v1/audit-events", params={"team": "acme"}, headers=api.admin)
        assert [e["action"] for e in r.json()["items"]] == [
            "team.delete",
            "team.update",
            "team.create",
        ]
