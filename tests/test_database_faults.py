"""PostgreSQL going away under a running app: a real TCP proxy between the app and PostgreSQL,
cut and restored. Admin routes fail fast with a clean 503; cached vends do not notice; everything
recovers by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from app.main import create_app
from tests.conftest import Api, Env, make_settings
from tests.support.tcp_proxy import CutMode, TcpProxy

pytestmark = pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)

DB_TIMEOUT = 1.0
# "About a second": the pool's checkout/connect timeout of 1 s, and slack for a loaded machine.
FAIL_FAST_SECONDS = DB_TIMEOUT + 0.5


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        yield proxy


def through(proxy: TcpProxy, database_url: str) -> str:
    parts = urlsplit(database_url)
    netloc = f"{parts.username}@127.0.0.1:{proxy.port}" if parts.username else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))


async def admin_calls(
    http: httpx.AsyncClient, admin: dict[str, str]
) -> list[tuple[httpx.Response, float]]:
    """A read, a read of a credential (database plus cache) and a write; each with its time."""
    results = []
    for method, url, body in [
        ("GET", "/v1/teams", None),
        ("GET", "/v1/teams/acme/credentials/default", None),
        ("POST", "/v1/teams", {"slug": "another"}),
    ]:
        started = time.monotonic()
        r = await http.request(method, url, json=body, headers=admin)
        results.append((r, time.monotonic() - started))
    return results


@asynccontextmanager
async def warm_app(env: Env, proxy: TcpProxy) -> AsyncIterator[Warm]:
    """An app whose database is behind the proxy, with a vended (cached) JWT and warm
    in-process caches; the proxy is restored before shutdown, whatever the test did."""
    settings = make_settings(
        **{
            **env.settings.model_dump(),
            "database_url": through(proxy, env.settings.database_url.get_secret_value()),
            "db_timeout_seconds": DB_TIMEOUT,
        }
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tv.test") as http:
            api = Api(http, env.admin_key)
            await api.team()
            await api.credential()
            _, client = await api.client(["acme"])
            # Warm: the first request after the admin changes above observes the new cache
            # generation and drops what it loaded; the second one's lookups stay in memory.
            for _ in range(2):
                r = await http.get("/v1/teams/acme/token", headers=client)
                assert r.status_code == 200
                assert (await http.get("/v1/teams", headers=api.admin)).status_code == 200
            try:
                yield Warm(http, api.admin, client, r.json()["access_token"])
            finally:
                proxy.restore()


@dataclass
class Warm:
    http: httpx.AsyncClient
    admin: dict[str, str]
    client: dict[str, str]
    jwt: str


class TestDatabaseDown:
    @pytest.mark.parametrize("mode", ["refuse", "hang"])
    async def test_admin_routes_fail_fast_with_a_clean_503(
        self, env: Env, pg_proxy: TcpProxy, mode: CutMode
    ) -> None:
        async with warm_app(env, pg_proxy) as app:
            pg_proxy.cut(mode)

            for r, took in await admin_calls(app.http, app.admin):
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert int(r.headers["retry-after"]) >= 1
                for leak in ("Traceback", "asyncpg", "sqlalchemy", "5432", "postgres", "Error"):
                    assert leak not in r.text
                assert took < FAIL_FAST_SECONDS, took
            ready = await app.http.get("/readyz")
            assert ready.status_code == 503

    async def test_the_problem_says_the_database_is_unavailable(
        self, env: Env, pg_proxy: TcpProxy
    ) -> None:
        async with warm_app(env, pg_proxy) as app:
            pg_proxy.cut("refuse")

            codes = {r.json()["code"] for r, _ in await admin_calls(app.http, app.admin)}

            assert codes == {"database-unavailable"}

    @pytest.mark.parametrize("mode", ["refuse", "hang"])
    async def test_cached_vends_go_on_and_admin_routes_recover_by_themselves(
        self, env: Env, pg_proxy: TcpProxy, mode: CutMode
    ) -> None:
        async with warm_app(env, pg_proxy) as app:
            pg_proxy.cut(mode)
            assert (await app.http.get("/v1/teams", headers=app.admin)).status_code == 503

            # The hot path reads only process memory while its caches are trusted.
            for _ in range(20):
                started = time.monotonic()
                r = await app.http.get("/v1/teams/acme/token", headers=app.client)
                assert r.status_code == 200, r.text
                assert r.json()["access_token"] == app.jwt
                assert time.monotonic() - started < 0.5

            pg_proxy.restore()

            recovered_in = await until_ok(app.http, app.admin, within=5.0)
            assert recovered_in < 5.0
            assert (await app.http.get("/readyz")).status_code == 200
            r = await app.http.post("/v1/teams", json={"slug": "after"}, headers=app.admin)
            assert r.status_code == 201


async def until_ok(http: httpx.AsyncClient, admin: dict[str, str], within: float) -> float:
    started = time.monotonic()
    while True:
        r = await http.get("/v1/teams", headers=admin)
        if r.status_code == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < within, r.text
        await asyncio.sleep(0.1)
