"""Fixtures: each test gets a fresh app on one of two backends, with the development IdM running
as a real HTTP server.

- `sqlite-memory`: the embedded default, a migrated SQLite file per test and the in-process cache.
- `postgres-redis`: production shape, a migrated PostgreSQL database per session (tables emptied
  per test) and Redis under a key prefix of the test's own.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.auth import keys
from app.cli import upgrade_database
from app.core.config import Settings
from app.core.crypto import Keyring
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm, create_dev_idm_app
from app.main import create_app
from tests.fixtures.services import (
    REDIS_URL,
    asyncpg_url,
    fresh_database,
    pg_execute,
    redis_prefix,
)
from tests.support.servers import ServerThread

BACKENDS = ["sqlite-memory", "postgres-redis"]
TABLES = "audit_events, credentials, clients, teams"


@pytest.fixture(scope="session")
def dev_idm_server() -> Iterator[tuple[DevIdm, str]]:
    idm = DevIdm()
    with ServerThread(create_dev_idm_app(idm)) as server:
        yield idm, server.url


@pytest.fixture
def idm(dev_idm_server: tuple[DevIdm, str]) -> DevIdm:
    dev_idm, _ = dev_idm_server
    dev_idm.reset()
    return dev_idm


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("db") / "template.db"
    upgrade_database(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with fresh_database("test") as name:
        url = asyncpg_url(name)
        upgrade_database(url)
        yield url


@dataclass
class Env:
    backend: str
    settings: Settings
    admin_key: str
    idm: DevIdm


def make_settings(**overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{
            "dev": False,
            "encryption_keys": Keyring.generate_spec("test"),
            "log_format": "console",
            "default_min_ttl_seconds": 300,
            **overrides,
        },
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def env(
    backend: str,
    request: pytest.FixtureRequest,
    idm: DevIdm,
    dev_idm_server: tuple[DevIdm, str],
    sqlite_template: Path,
    tmp_path: Path,
) -> Iterator[Env]:
    # Synchronous on purpose: the PostgreSQL fixture and the clean-ups run their own event loops.
    _, idm_url = dev_idm_server
    admin_key = keys.issue_key().key.get_secret_value()
    common = {"phrase_eu_url": idm_url, "phrase_us_url": idm_url, "bootstrap_admin_key": admin_key}
    if backend == "sqlite-memory":
        db = tmp_path / "tokenvend.db"
        shutil.copy(sqlite_template, db)
        settings = make_settings(database_url=f"sqlite+aiosqlite:///{db}", **common)
        yield Env(backend, settings, admin_key, idm)
        return
    pg_url: str = request.getfixturevalue("postgres_url")
    asyncio.run(truncate(pg_url))
    with redis_prefix() as prefix:
        settings = make_settings(
            database_url=pg_url, redis_url=REDIS_URL, redis_prefix=prefix, **common
        )
        yield Env(backend, settings, admin_key, idm)


async def truncate(url: str) -> None:
    """Empty every table of the test database at `url` (a SQLAlchemy asyncpg URL)."""
    await pg_execute(f"TRUNCATE {TABLES} CASCADE", url.replace("+asyncpg", ""))


@pytest.fixture
async def app(env: Env) -> AsyncIterator[FastAPI]:
    application = create_app(env.settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenvend.test") as client:
        yield client


class Api:
    """Short hands for the admin calls most tests start with."""

    def __init__(self, http: httpx.AsyncClient, admin_key: str) -> None:
        self.http = http
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    async def team(self, slug: str = "acme") -> dict[str, Any]:
        r = await self.http.post("/v1/teams", json={"slug": slug}, headers=self.admin)
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def credential(
        self,
        team: str = "acme",
        name: str = "default",
        api_token: str | None = None,
        region: str = "eu",
    ) -> str:
        token = api_token or f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"
        r = await self.http.post(
            f"/v1/teams/{team}/credentials",
            json={"name": name, "region": region, "api_token": token},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        return token

    async def client(self, teams: list[str], role: str = "client") -> tuple[str, dict[str, str]]:
        r = await self.http.post(
            "/v1/clients", json={"name": "svc", "role": role, "teams": teams}, headers=self.admin
        )
        assert r.status_code == 201, r.text
        body = r.json()
        return body["client"]["id"], {"Authorization": f"Bearer {body['api_key']}"}


@pytest.fixture
def api(http: httpx.AsyncClient, env: Env) -> Api:
    return Api(http, env.admin_key)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of its own, removed afterwards (sync, so async fixtures can ask)."""
    with redis_prefix() as prefix:
        yield prefix


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Redis]:
    """A client of the test Redis; keys go under `prefix`."""
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()
