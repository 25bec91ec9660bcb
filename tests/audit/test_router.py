from __future__ import annotations

import datetime as dt

import httpx

from tests.conftest import Api


class TestAuditEvents:
    async def test_every_vend_is_recorded_with_cache_result_and_jwt_fingerprint_only(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        await api.credential()
        client_id, key = await api.client(["acme"])
        tokens = [
            (
                await http.get("/v1/teams/acme/token", headers={**key, "X-Request-ID": f"req-{i}"})
            ).json()
            for i in range(2)
        ]

        r = await http.get("/v1/audit-events", params={"action": "token.vend"}, headers=api.admin)

        events = r.json()["items"]
        assert [(e["cache"], e["request_id"]) for e in events] == [
            ("hit", "req-1"),
            ("miss", "req-0"),
        ]
        assert all(e["actor_client_id"] == client_id for e in events)
        assert all(e["outcome"] == "ok" and e["team"] == "acme" for e in events)
        assert len(events[0]["jwt_sha256"]) == 16
        assert tokens[0]["access_token"] not in r.text

    async def test_failed_vends_are_recorded_with_their_code(
        self, http: httpx.AsyncClient, api: Api
    ) -> None:
        await api.team()
        _, key = await api.client(["acme"])
        await http.get("/v1/teams/acme/token", headers=key)
        r = await http.get("/v1/audit-events", params={"action": "token.vend"}, headers=api.admin)
        assert [e["outcome"] for e in r.json()["items"]] == ["credential-not-found"]

    async def test_filters_by_client_and_time(self, http: httpx.AsyncClient, api: Api) -> None:
        await api.team("a")
        client_id, _ = await api.client([])
        r = await http.get("/v1/audit-events", params={"client_id": client_id}, headers=api.admin)
        assert r.json()["items"] == []
        future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        r = await http.get("/v1/audit-events", params={"since": future}, headers=api.admin)
        assert r.json()["items"] == []
        past = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).isoformat()
        r = await http.get(
            "/v1/audit-events", params={"since": past, "limit": 1}, headers=api.admin
        )
        assert len(r.json()["items"]) == 1
        assert r.json()["next_offset"] == 1
