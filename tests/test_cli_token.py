"""`tokenvend token get`: the real console script against a real tokenvend (SQLite, in-process
cache, development IdM) served by uvicorn in a thread."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.auth import keys
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm
from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import ServerThread

TOKENVEND = Path(sys.executable).parent / "tokenvend"


@dataclass
class Server:
    url: str
    idm: DevIdm
    admin: dict[str, str] = field(repr=False)
    client_key: str = field(repr=False)

    def post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        r = httpx.post(f"{self.url}{path}", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        result: dict[str, object] = r.json()
        return result

    def vend(self, team: str, credential: str = "default") -> str:
        r = httpx.get(
            f"{self.url}/v1/teams/{team}/token",
            params={"credential": credential},
            headers={"Authorization": f"Bearer {self.client_key}"},
        )
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token


@pytest.fixture
def server(
    idm: DevIdm, dev_idm_server: tuple[DevIdm, str], sqlite_template: Path, tmp_path: Path
) -> Iterator[Server]:
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
    )
    with ServerThread(create_app(settings)) as running:
        srv = Server(running.url, idm, {"Authorization": f"Bearer {admin_key}"}, "")
        for team in ("acme", "other"):
            srv.post("/v1/teams", {"slug": team})
            srv.post(
                f"/v1/teams/{team}/credentials",
                {"region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"},
            )
        srv.post(
            "/v1/teams/acme/credentials",
            {"name": "tms", "region": "us", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"},
        )
        client = srv.post("/v1/clients", {"name": "billing", "teams": ["acme"]})
        srv.client_key = str(client["api_key"])
        yield srv


def token_get(*args: str, url: str | None, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENVEND_")}
    if url is not None:
        env["TOKENVEND_URL"] = url
    if key is not None:
        env["TOKENVEND_API_KEY"] = key
    return subprocess.run(
        [str(TOKENVEND), "token", "get", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class TestTokenGet:
    def test_prints_only_the_jwt_and_a_newline(self, server: Server) -> None:
        result = token_get("acme", url=server.url, key=server.client_key)

        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout == server.vend("acme") + "\n"  # tokenvend's cached JWT, as printed
        assert server.idm.exchanges == 1

    def test_credential_is_passed_on(self, server: Server) -> None:
        result = token_get(
            "acme", "--credential", "tms", url=server.url + "/", key=server.client_key
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == server.vend("acme", "tms") + "\n"

    def test_min_ttl_is_passed_on(self, server: Server) -> None:
        server.idm.set_mode(expires_in=400)  # enough for the default min_ttl (300), not for 600

        result = token_get("acme", "--min-ttl", "600", url=server.url, key=server.client_key)
        assert result.returncode == 1
        assert result.stderr.startswith("tokenvend: upstream-lifetime-too-short: ")

        result = token_get("acme", url=server.url, key=server.client_key)
        assert result.returncode == 0, result.stderr

    def test_an_error_goes_to_stderr_as_code_and_detail(self, server: Server) -> None:
        result = token_get("other", url=server.url, key=server.client_key)

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("tokenvend: team-not-granted: ")
        assert result.stderr.count("\n") == 1
        assert server.client_key not in result.stderr

    def test_a_bad_key_is_reported_and_never_printed(self, server: Server) -> None:
        key = server.client_key[:-4] + "AAAA"
        result = token_get("acme", url=server.url, key=key)

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("tokenvend: unauthenticated: ")
        assert key not in result.stderr

    def test_a_missing_key_is_a_usage_error(self) -> None:
        result = token_get("acme", url="http://127.0.0.1:1", key=None)

        assert result.returncode == 2
        assert result.stdout == ""
        assert "TOKENVEND_API_KEY" in result.stderr

    def test_an_unreachable_tokenvend_is_reported(self) -> None:
        key = "tvk_abc_" + "s" * 43
        result = token_get("acme", url="http://127.0.0.1:1", key=key)

        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("tokenvend: unreachable: http://127.0.0.1:1: ")
        assert key not in result.stderr
