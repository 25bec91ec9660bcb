"""schemathesis over every operation, as admin and as client, against a real server: no server
error, no response that violates the schema, no undocumented status code or content type."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import Env
from tests.support.servers import ServerThread

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


@pytest.fixture
def server(env: Env) -> Iterator[tuple[str, dict[str, str]]]:
    settings = env.settings.model_copy(update={"rate_limit_per_second": 100_000.0})
    with ServerThread(create_app(settings)) as running:
        admin = {"Authorization": f"Bearer {env.admin_key}"}
        with httpx.Client(base_url=running.url, headers=admin) as http:
            assert http.post("/v1/teams", json={"slug": "acme"}).status_code == 201
            r = http.post(
                "/v1/teams/acme/credentials",
                json={"region": "eu", "api_token": "phrdev_contract_token_01"},
            )
            assert r.status_code == 201
            r = http.post("/v1/clients", json={"name": "svc", "teams": ["acme"]})
            keys = {"admin": env.admin_key, "client": r.json()["api_key"]}
        yield running.url, keys


@pytest.mark.parametrize("backend", ["sqlite-memory"], indirect=True)
@pytest.mark.parametrize("role", ["admin", "client"])
def test_every_operation_keeps_its_contract(
    server: tuple[str, dict[str, str]], role: str, tmp_path: Path
) -> None:
    url, keys = server
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            SCHEMATHESIS,
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {keys[role]}",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "15",
            "--workers",
            "1",
            "--seed",
            "1",
            "--exclude-path",
            "/metrics",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout[-4000:]
    print(summary)
    assert result.returncode == 0, summary + result.stderr[-2000:]
