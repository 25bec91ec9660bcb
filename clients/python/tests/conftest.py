"""A real tokenvend for the client tests: `create_app` under uvicorn in a thread, on a migrated
SQLite file with the in-process cache, exchanging at the development IdM (a real HTTP server).

The dev IdM fixtures come from the tokenvend suite's conftest, imported by name: `pytest_plugins`
is not allowed outside the root conftest. This directory has no `__init__.py` on purpose: as a
package it would be named `tests` too and clash with the tokenvend suite's package.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.auth import keys
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm
from app.main import create_app
from tests.conftest import dev_idm_server, idm, make_settings, sqlite_template
from tests.support.servers import ServerThread

__all__ = ["dev_idm_server", "idm", "sqlite_template"]

TEAM = "acme"


@dataclass
class Tokenvend:
    """A running tokenvend with team `acme` (an API token the dev IdM accepts) and a client key
    granted `acme`. `requests` records what `http` (and `async_http`) sent to tokenvend."""

    url: str
    admin_http: httpx.Client = field(repr=False)
    admin_key: str = field(repr=False)
    idm: DevIdm
    client_key: str = field(default="", repr=False)
    api_token: str = field(default="", repr=False)
    requests: list[httpx.Request] = field(default_factory=list)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.admin_http.request(method, path, **kwargs)

    def add_team(self, slug: str, api_token: str | None = None) -> str:
        token = api_token or f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"
        r = self.admin("POST", "/v1/teams", json={"slug": slug})
        assert r.status_code == 201, r.text
        r = self.admin(
            "POST",
            f"/v1/teams/{slug}/credentials",
            json={"name": "default", "region": "eu", "api_token": token},
        )
        assert r.status_code == 201, r.text
        return token

    def add_client(self, teams: list[str]) -> str:
        r = self.admin("POST", "/v1/clients", json={"name": "svc", "teams": teams})
        assert r.status_code == 201, r.text
        key: str = r.json()["api_key"]
        return key

    def token_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith("/token")]


@pytest.fixture(scope="session")
def stopping_servers() -> Iterator[list[ServerThread]]:
    """Servers told to stop, joined at the end of the session: each test's tokenvend winds down
    (about 0.2 s) while the next test runs instead of before it."""
    servers: list[ServerThread] = []
    yield servers
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def tokenvend_settings() -> dict[str, Any]:
    """Settings overrides: `@pytest.mark.parametrize("tokenvend_settings", [{...}])`."""
    return {}


@pytest.fixture
def tokenvend(
    idm: DevIdm,
    dev_idm_server: tuple[DevIdm, str],
    sqlite_template: Path,
    tmp_path: Path,
    stopping_servers: list[ServerThread],
    tokenvend_settings: dict[str, Any],
) -> Iterator[Tokenvend]:
    _, idm_url = dev_idm_server
    db = tmp_path / "tokenvend.db"
    shutil.copy(sqlite_template, db)
    admin_key = keys.issue_key().key.get_secret_value()
    settings = make_settings(
        database_url=f"sqlite+aiosqlite:///{db}",
        phrase_eu_url=idm_url,
        phrase_us_url=idm_url,
        bootstrap_admin_key=admin_key,
        upstream_retries=0,
        **tokenvend_settings,
    )
    server = ServerThread(create_app(settings)).__enter__()
    try:
        headers = {"Authorization": f"Bearer {admin_key}"}
        with httpx.Client(base_url=server.url, headers=headers) as admin_http:
            env = Tokenvend(server.url, admin_http, admin_key, idm)
            env.api_token = env.add_team(TEAM)
            env.client_key = env.add_client([TEAM])
            yield env
    finally:
        server.server.should_exit = True
        stopping_servers.append(server)


@pytest.fixture
def http(tokenvend: Tokenvend) -> Iterator[httpx.Client]:
    """The httpx client the TokenVendClient under test uses; it records every request."""
    with httpx.Client(event_hooks={"request": [tokenvend.requests.append]}) as client:
        yield client


@pytest.fixture
async def async_http(tokenvend: Tokenvend) -> AsyncIterator[httpx.AsyncClient]:
    async def record(request: httpx.Request) -> None:
        tokenvend.requests.append(request)

    async with httpx.AsyncClient(event_hooks={"request": [record]}) as client:
        yield client
