"""The audit trail fails closed and loses nothing.

The service runs on PostgreSQL through a TCP proxy the test cuts. While the database is away,
vends of cached JWTs go on (the hot path never waits on the database) and their audit records
wait in a bounded buffer. Once `max_pending` records wait, or writes have failed for
`max_unwritten_seconds`, the token routes refuse with 503 `audit-unavailable` rather than vend
unaudited. When the database returns every buffered record is written (counted by request id)
and vending resumes. The limits are made small by setting the app's `AuditLog` attributes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from app.audit.service import AuditLog
from app.auth.keys import issue_key
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm
from tests.conftest import make_settings, truncate
from tests.fixtures.services import REDIS_URL, redis_prefix
from tests.security import serving
from tests.support.tcp_proxy import TcpProxy

TOKEN_URL = "/v1/teams/acme/token"


@dataclass
class Stack:
    app: FastAPI
    http: httpx.AsyncClient
    proxy: TcpProxy
    client: dict[str, str]
    client_key: str
    database_url: str  # straight to PostgreSQL, around the proxy

    @property
    def audit(self) -> AuditLog:
        audit: AuditLog = self.app.state.infra.audit
        return audit

    async def vend(self) -> httpx.Response:
        return await self.http.get(TOKEN_URL, headers=self.client)

    async def oauth(self) -> httpx.Response:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": self.client_key,
            "subject_token_type": "urn:tokenvend:params:oauth:token-type:client_key",
            "audience": "acme",
        }
        return await self.http.post("/oauth/token", data=form)

    async def audited_vends(self) -> set[str]:
        """Request ids of the vends in the trail, read straight from PostgreSQL."""
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(
                "SELECT request_id FROM audit_events WHERE action = 'token.vend'"
            )
        finally:
            await conn.close()
        return {r["request_id"] for r in rows}


@pytest.fixture
def audit_prefix() -> Iterator[str]:
    with redis_prefix("audit") as prefix:
        yield prefix


@pytest.fixture
async def stack(
    postgres_url: str, audit_prefix: str, dev_idm_server: tuple[DevIdm, str], idm: DevIdm
) -> AsyncIterator[Stack]:
    await truncate(postgres_url)
    direct = postgres_url.replace("+asyncpg", "")
    database = postgres_url.rsplit("/", 1)[1]
    admin_key = issue_key().key.get_secret_value()
    with TcpProxy("127.0.0.1", 5432) as proxy:
        settings = make_settings(
            database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/{database}",
            redis_url=REDIS_URL,
            redis_prefix=audit_prefix,
            phrase_eu_url=dev_idm_server[1],
            phrase_us_url=dev_idm_server[1],
            bootstrap_admin_key=admin_key,
        )
        async with serving(settings) as (app, http):
            admin = {"Authorization": f"Bearer {admin_key}"}
            assert (await http.post("/v1/teams", json={"slug": "acme"}, headers=admin)).is_success
            body = {"region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"}
            r = await http.post("/v1/teams/acme/credentials", json=body, headers=admin)
            assert r.status_code == 201
            r = await http.post(
                "/v1/clients", json={"name": "svc", "teams": ["acme"]}, headers=admin
            )
            key = r.json()["api_key"]
            stack = Stack(app, http, proxy, {"Authorization": f"Bearer {key}"}, key, direct)
            # Twice: the first request after an admin change on this replica flushes process
            # memory once more (it reads the new generation), dropping what it loaded itself.
            for _ in range(2):
                assert (await stack.vend()).status_code == 200
            # Now the key, the credential and the JWT are in process memory.
            await stack.audit.flush()
            try:
                yield stack
            finally:
                proxy.restore() if proxy.state != "open" else None


async def wait_until(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def assert_audit_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "audit-unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert "access_token" not in r.text


class TestAuditFailsClosed:
    async def test_vends_go_on_within_max_pending_then_stop_and_nothing_is_lost(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        audit = stack.audit
        monkeypatch.setattr(audit, "_max_pending", 5)
        monkeypatch.setattr(audit, "_max_unwritten", 3600.0)
        before = await stack.audited_vends()

        stack.proxy.cut("hang")  # a database that accepts connections and never answers
        served = [await stack.vend() for _ in range(5)]
        assert [(r.status_code, r.json()["cache"]) for r in served] == [(200, "hit")] * 5
        # The writer takes the five into a write that cannot finish. They are still unwritten:
        # the sixth vend is one too many, whether the records wait in the buffer or in the write.
        await wait_until(audit._lock.locked)
        assert_audit_unavailable(await stack.vend())
        oauth = await stack.oauth()
        assert oauth.status_code == 503
        assert oauth.json()["error"] == "temporarily_unavailable"

        stack.proxy.restore()
        await wait_until(lambda: audit.pending == 0 and audit.accepting())
        resumed = await stack.vend()
        assert resumed.status_code == 200
        await audit.flush()

        after = await stack.audited_vends()
        ids = {r.headers["x-request-id"] for r in [*served, resumed]}
        assert after - before == ids, "every vend is in the trail, and nothing else"

    async def test_writes_failing_for_max_unwritten_seconds_stop_the_vends(
        self, stack: Stack, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        audit = stack.audit
        monkeypatch.setattr(audit, "_max_pending", 20_000)
        monkeypatch.setattr(audit, "_max_unwritten", 1.0)
        before = await stack.audited_vends()

        stack.proxy.cut("refuse")  # a database that is down
        served = [await stack.vend()]
        await wait_until(lambda: audit._failing_since is not None)  # a write has failed
        served.append(await stack.vend())  # still within max_unwritten_seconds
        assert [r.status_code for r in served] == [200, 200]
        await wait_until(lambda: not audit.accepting())
        assert_audit_unavailable(await stack.vend())
        assert audit.pending == 2

        stack.proxy.restore()
        await wait_until(lambda: audit.pending == 0 and audit.accepting())
        served.append(await stack.vend())
        assert served[-1].status_code == 200
        await audit.flush()

        after = await stack.audited_vends()
        assert after - before == {r.headers["x-request-id"] for r in served}
