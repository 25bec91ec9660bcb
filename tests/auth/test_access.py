"""Authentication and authorization through the real API, on both backends."""

from __future__ import annotations

import httpx

from tests.conftest import Api, Env

ADMIN_ROUTES = [
    ("POST", "/v1/teams"),
    ("GET", "/v1/teams"),
    ("GET", "/v1/teams/acme"),
    ("PATCH", "/v1/teams/acme"),
    ("DELETE", "/v1/teams/acme"),
    ("POST", "/v1/teams/acme/credentials"),
    ("GET", "/v1/teams/acme/credentials"),
    ("GET", "/v1/teams/acme/credentials/default"),
    ("PATCH", "/v1/teams/acme/credentials/default"),
    ("DELETE", "/v1/teams/acme/credentials/default"),
    ("PUT", "/v1/teams/acme/credentials/default/api-token"),
    ("DELETE", "/v1/teams/acme/token"),
    ("POST", "/v1/clients"),
    ("GET", "/v1/clients"),
    ("GET", "/v1/clients/00000000-0000-0000-0000-000000000000"),
    ("PATCH", "/v1/clients/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/v1/clients/00000000-0000-0000-0000-000000000000"),
    ("POST", "/v1/clients/00000000-0000-0000-0000-000000000000/rotate-key"),
    ("GET", "/v1/audit-events"),
]
ALL_ROUTES = [*ADMIN_ROUTES, ("GET", "/v1/teams/acme/token")]


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["request_id"] == r.headers["x-request-id"]


class TestAuthentication:
    async def test_missing_malformed_and_unknown_keys_get_401_on_every_route(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        unknown = "Bearer tvk_0123456789abcdef_" + "A" * 43
        for method, path in ALL_ROUTES:
            for auth in [None, "Bearer", "Bearer not-a-key", "Basic dXNlcjpwYXNz", unknown]:
                headers = {"Authorization": auth} if auth else {}
                r = await http.request(method, path, headers=headers, json={})
                assert_problem(r, 401, "unauthenticated")
                assert r.headers["www-authenticate"].startswith("Bearer")
        assert env.idm.requests == 0

    async def test_disabled_deleted_and_rotated_away_keys_stop_working_on_the_next_request(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        client_id, key = await api.client(["acme"])
        assert (await http.get("/v1/teams/acme/token", headers=key)).status_code == 200

        r = await http.patch(f"/v1/clients/{client_id}", json={"disabled": True}, headers=api.admin)
        assert r.json()["disabled"] is True
        assert_problem(await http.get("/v1/teams/acme/token", headers=key), 401, "unauthenticated")

        await http.patch(f"/v1/clients/{client_id}", json={"disabled": False}, headers=api.admin)
        assert (await http.get("/v1/teams/acme/token", headers=key)).status_code == 200

        rotated = await http.post(f"/v1/clients/{client_id}/rotate-key", headers=api.admin)
        new_key = {"Authorization": f"Bearer {rotated.json()['api_key']}"}
        assert_problem(await http.get("/v1/teams/acme/token", headers=key), 401, "unauthenticated")
        assert (await http.get("/v1/teams/acme/token", headers=new_key)).status_code == 200

        assert (await http.delete(f"/v1/clients/{client_id}", headers=api.admin)).status_code == 204
        assert_problem(
            await http.get("/v1/teams/acme/token", headers=new_key), 401, "unauthenticated"
        )


class TestAuthorization:
    async def test_a_client_key_on_admin_routes_gets_403(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential()
        _, client = await api.client(["*"])
        for method, path in ADMIN_ROUTES:
            r = await http.request(method, path, headers=client, json={})
            assert_problem(r, 403, "forbidden")
        teams = await http.get("/v1/teams/acme/credentials/default", headers=api.admin)
        assert teams.status_code == 200  # nothing was changed by the refused calls

    async def test_a_client_without_a_grant_gets_the_same_403_whether_or_not_the_team_exists(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team("acme")
        await api.credential("acme")
        await api.team("other")
        _, client = await api.client(["other"])

        existing = await http.get("/v1/teams/acme/token", headers=client)
        missing = await http.get("/v1/teams/nope/token", headers=client)

        assert_problem(existing, 403, "team-not-granted")
        assert_problem(missing, 403, "team-not-granted")
        strip = lambda r: {k: v for k, v in r.json().items() if k not in ("request_id", "detail")}  # noqa: E731
        assert strip(existing) == strip(missing)
        assert env.idm.requests == 0

    async def test_wildcard_grant_and_admin_may_vend_for_any_team(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team("acme")
        await api.credential("acme")
        _, wildcard = await api.client(["*"])
        assert (await http.get("/v1/teams/acme/token", headers=wildcard)).status_code == 200
        assert (await http.get("/v1/teams/acme/token", headers=api.admin)).status_code == 200

    async def test_a_granted_client_gets_404_for_a_missing_team(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        _, client = await api.client(["ghost"])
        assert_problem(
            await http.get("/v1/teams/ghost/token", headers=client), 404, "team-not-found"
        )

    async def test_denials_are_audited(self, http: httpx.AsyncClient, api: Api) -> None:
        _, client = await api.client(["other"])
        await http.get("/v1/teams/acme/token", headers=client)
        await http.get("/v1/teams", headers={"Authorization": "Bearer nope"})

        r = await http.get("/v1/audit-events", params={"action": "auth.denied"}, headers=api.admin)

        outcomes = sorted(e["outcome"] for e in r.json()["items"])
        assert outcomes == ["team-not-granted", "unauthenticated"]
