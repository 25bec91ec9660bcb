"""The `tokenvend` command line, run as the installed console script in real processes.

Every command runs in its own temporary directory (`serve --dev` keeps its state in `.tokenvend/`
under the working directory) with an environment stripped of every `TOKENVEND_*` variable, so
nothing from the developer's shell or CI leaks into what is being tested.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt

from app.auth import keys
from app.core.config import Settings
from app.core.crypto import Keyring
from app.integrations.phrase.client import GRANT_TYPE_TOKEN_EXCHANGE
from app.main import create_app

TOKENVEND = Path(sys.executable).parent / "tokenvend"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLIENT_KEY = re.compile(r"^tvk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$")
PRINTED_KEYS = re.compile(r"^  admin key:  (tvk_\S+)\n  client key: (tvk_\S+)", re.MULTILINE)


def cli_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENVEND_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | values


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOKENVEND), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Running:
    """A long-running `tokenvend` command whose output goes to files (a pipe nobody drains could
    block the server)."""

    process: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def output(self) -> str:
        return self.stdout + self.stderr_path.read_text()

    def _check_alive(self, waiting_for: str) -> None:
        if self.process.poll() is not None:
            pytest.fail(
                f"exited with {self.process.returncode} while waiting for {waiting_for}:\n"
                f"{self.output}"
            )

    def printed_keys(self) -> tuple[str, str]:
        """The admin and client keys `serve --dev` prints at start."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (match := PRINTED_KEYS.search(self.stdout)) is None:
            self._check_alive("the printed keys")
            assert time.monotonic() < deadline, f"no keys printed:\n{self.output}"
            time.sleep(0.05)
        return match.group(1), match.group(2)

    def wait_until_answering(self, path: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            self._check_alive(path)
            try:
                if httpx.get(f"{self.url}{path}", timeout=1.0, trust_env=False).is_success:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{path} never answered:\n{self.output}"
            time.sleep(0.05)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the process took to stop."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT} s after SIGTERM:\n{self.output}")
        return code, time.monotonic() - start


@contextmanager
def started(*args: str, cwd: Path, env: dict[str, str], port: int) -> Iterator[Running]:
    n = len(list(cwd.glob("process-*.stdout")))
    stdout_path, stderr_path = cwd / f"process-{n}.stdout", cwd / f"process-{n}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [str(TOKENVEND), *args, "--port", str(port)], cwd=cwd, env=env, stdout=out, stderr=err
        )
    try:
        yield Running(process, f"http://127.0.0.1:{port}", stdout_path, stderr_path)
    finally:
        if process.poll() is None:  # a failed test must not leave a server behind
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def serve_dev(cwd: Path, **env: str) -> AbstractContextManager[Running]:
    return started("serve", "--dev", cwd=cwd, env=cli_env(**env), port=free_port())


@asynccontextmanager
async def in_process_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenvend.test") as http:
            yield http


def app_settings(**values: Any) -> Settings:
    """Explicit values for what matters, whatever the test process's environment holds."""
    return Settings(
        _env_file=None,
        **{
            "dev": False,
            "redis_url": None,
            "bootstrap_admin_key": None,
            "encryption_keys": Keyring.generate_spec("test"),
            "log_format": "console",
            **values,
        },
    )


class TestServeDev:
    def test_printed_keys_vend_a_jwt_manage_teams_and_nothing_secret_is_logged(
        self, tmp_path: Path
    ) -> None:
        # Debug logging is the most talkative setting: if a JWT or an API token were logged
        # anywhere, it would be here.
        with serve_dev(tmp_path, TOKENVEND_LOG_LEVEL="debug") as server:
            admin_key, client_key = server.printed_keys()
            server.wait_until_answering("/healthz")
            with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as http:
                first = http.get("/v1/teams/demo/token", headers=bearer(client_key))
                second = http.get("/v1/teams/demo/token", headers=bearer(client_key))
                created = http.post("/v1/teams", json={"slug": "cli"}, headers=bearer(admin_key))
                listed_by_client = http.get("/v1/teams", headers=bearer(client_key))
                docs = http.get("/docs")
            code, stop_seconds = server.terminate()

        assert CLIENT_KEY.match(admin_key)
        assert CLIENT_KEY.match(client_key)
        assert first.status_code == 200, first.text
        vended = first.json()
        assert vended["access_token"].count(".") == 2
        assert (vended["team"], vended["cache"]) == ("demo", "miss")
        assert second.status_code == 200, second.text
        assert second.json()["cache"] == "hit"
        assert second.json()["access_token"] == vended["access_token"]
        assert created.status_code == 201, created.text
        assert listed_by_client.status_code == 403, listed_by_client.text
        assert docs.status_code == 200

        dev_dir = tmp_path / ".tokenvend"
        assert stat.S_IMODE((dev_dir / "encryption.key").stat().st_mode) == 0o600
        assert (dev_dir / "dev.db").is_file()

        output = server.output
        assert (
            "service.started" in output
        )  # the logs were captured, so their silence means something
        assert vended["access_token"] not in output
        assert vended["access_token"].rsplit(".", 1)[1] not in output  # not even the signature
        assert "phrdev_" not in output  # the demo credential's API token

        assert code == 0, output
        assert stop_seconds < STOP_TIMEOUT

    def test_restart_prints_new_keys_and_still_decrypts_the_stored_credential(
        self, tmp_path: Path
    ) -> None:
        with serve_dev(tmp_path) as first:
            old_admin, old_client = first.printed_keys()
            first.wait_until_answering("/healthz")
            first_code, _ = first.terminate()
        encryption_key = (tmp_path / ".tokenvend" / "encryption.key").read_text()

        with serve_dev(tmp_path) as second:
            new_admin, new_client = second.printed_keys()
            second.wait_until_answering("/healthz")
            with httpx.Client(base_url=second.url, timeout=10, trust_env=False) as http:
                old_client_vend = http.get("/v1/teams/demo/token", headers=bearer(old_client))
                old_admin_list = http.get("/v1/teams", headers=bearer(old_admin))
                new_client_vend = http.get("/v1/teams/demo/token", headers=bearer(new_client))
                new_admin_list = http.get("/v1/teams", headers=bearer(new_admin))
            second_code, stop_seconds = second.terminate()

        assert new_admin != old_admin
        assert new_client != old_client
        assert old_client_vend.status_code == 401, old_client_vend.text
        assert old_admin_list.status_code == 401, old_admin_list.text
        assert new_client_vend.status_code == 200, new_client_vend.text
        assert new_client_vend.json()["cache"] == "miss"  # a new process: exchanged again
        assert new_admin_list.status_code == 200, new_admin_list.text
        assert [t["slug"] for t in new_admin_list.json()["items"]] == ["demo"]  # seeded once
        assert (tmp_path / ".tokenvend" / "encryption.key").read_text() == encryption_key
        assert (first_code, second_code) == (0, 0)
        assert stop_seconds < STOP_TIMEOUT


class TestServeConfiguration:
    """Bad configuration stops `serve` before it binds a port: exit status 2 and one line per bad
    value on stderr, naming the variable and never echoing the value."""

    @staticmethod
    def problem_lines(stderr: str) -> dict[str, list[str]]:
        lines: dict[str, list[str]] = {}
        for line in stderr.splitlines():
            name, sep, _ = line.strip().partition(":")
            if sep and name.startswith("TOKENVEND_"):
                lines.setdefault(name, []).append(line)
        return lines

    def test_several_workers_need_redis(self, tmp_path: Path) -> None:
        env = cli_env(TOKENVEND_ENCRYPTION_KEYS=Keyring.generate_spec("k1"))

        result = run_cli(
            "serve", "--workers", "2", "--port", str(free_port()), cwd=tmp_path, env=env
        )

        assert result.returncode == 2, result.stderr
        assert list(self.problem_lines(result.stderr)) == ["TOKENVEND_REDIS_URL"], result.stderr

    def test_missing_encryption_keys_are_named(self, tmp_path: Path) -> None:
        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=cli_env())

        assert result.returncode == 2, result.stderr
        assert any("TOKENVEND_ENCRYPTION_KEYS" in line for line in result.stderr.splitlines())
        assert "Traceback" not in result.stderr

    def test_each_bad_value_gets_its_own_line_without_echoing_the_value(
        self, tmp_path: Path
    ) -> None:
        bad_key = "bm90LTMyLWJ5dGVz"  # base64 of 12 bytes, not 32
        env = cli_env(
            TOKENVEND_ENCRYPTION_KEYS=f"k1:{bad_key}", TOKENVEND_EXPIRY_MARGIN_SECONDS="-5"
        )

        result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env)

        assert result.returncode == 2, result.stderr
        lines = self.problem_lines(result.stderr)
        assert sorted(lines) == ["TOKENVEND_ENCRYPTION_KEYS", "TOKENVEND_EXPIRY_MARGIN_SECONDS"]
        assert all(len(found) == 1 for found in lines.values()), result.stderr
        assert bad_key not in result.stderr + result.stdout
        assert "Traceback" not in result.stderr


class TestKeysGenerate:
    def test_prints_one_new_parseable_key_each_time(self, tmp_path: Path) -> None:
        results = [run_cli("keys", "generate", cwd=tmp_path, env=cli_env()) for _ in range(2)]

        specs = []
        for result in results:
            assert result.returncode == 0, result.stderr
            lines = result.stdout.splitlines()
            assert len(lines) == 1, result.stdout
            assert re.fullmatch(r"[A-Za-z0-9_.-]{1,32}:[A-Za-z0-9+/]{43}=", lines[0])
            Keyring.parse(lines[0])
            specs.append(lines[0])
        assert specs[0] != specs[1]
        assert specs[0].split(":")[1] != specs[1].split(":")[1]

    def test_kid_option_names_the_key(self, tmp_path: Path) -> None:
        result = run_cli("keys", "generate", "--kid", "2026-11", cwd=tmp_path, env=cli_env())

        assert result.returncode == 0, result.stderr
        assert Keyring.parse(result.stdout.strip()).key_ids == ["2026-11"]


class TestAdminCreateKey:
    async def test_key_made_on_a_freshly_migrated_database_is_an_admin(
        self, tmp_path: Path
    ) -> None:
        url = f"sqlite+aiosqlite:///{tmp_path / 'tokenvend.db'}"
        spec = Keyring.generate_spec("k1")
        env = cli_env(TOKENVEND_DATABASE_URL=url, TOKENVEND_ENCRYPTION_KEYS=spec)

        upgraded = await asyncio.to_thread(run_cli, "db", "upgrade", cwd=tmp_path, env=env)
        created = await asyncio.to_thread(
            run_cli, "admin", "create-key", "--name", "ops", cwd=tmp_path, env=env
        )

        assert upgraded.returncode == 0, upgraded.stderr
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert CLIENT_KEY.match(key), created.stdout
        stranger = keys.issue_key().key.get_secret_value()
        async with in_process_app(app_settings(database_url=url, encryption_keys=spec)) as http:
            teams = await http.get("/v1/teams", headers=bearer(key))
            clients = await http.get("/v1/clients", headers=bearer(key))
            refused = await http.get("/v1/teams", headers=bearer(stranger))
        assert teams.status_code == 200, teams.text
        assert clients.status_code == 200, clients.text
        assert [(c["name"], c["role"]) for c in clients.json()["items"]] == [("ops", "admin")]
        assert refused.status_code == 401


class TestBootstrapAdminKey:
    async def test_key_is_an_admin_and_a_restart_does_not_add_another(
        self, tmp_path: Path, sqlite_template: Path
    ) -> None:
        db = tmp_path / "tokenvend.db"
        await asyncio.to_thread(shutil.copy, sqlite_template, db)
        key = keys.issue_key().key.get_secret_value()
        settings = app_settings(database_url=f"sqlite+aiosqlite:///{db}", bootstrap_admin_key=key)

        starts = []
        for slug in ("first", "second"):
            async with in_process_app(settings) as http:
                created = await http.post("/v1/teams", json={"slug": slug}, headers=bearer(key))
                clients = await http.get("/v1/clients", headers=bearer(key))
            starts.append((created, clients))

        for created, clients in starts:
            assert created.status_code == 201, created.text
            assert clients.status_code == 200, clients.text
            items = clients.json()["items"]
            assert [(c["role"], c["teams"]) for c in items] == [("admin", ["*"])]
        first_id = starts[0][1].json()["items"][0]["id"]
        assert starts[1][1].json()["items"][0]["id"] == first_id


class TestDevIdm:
    def test_runs_alone_and_exchanges_only_development_tokens(self, tmp_path: Path) -> None:
        def exchange(http: httpx.Client, subject_token: str) -> httpx.Response:
            return http.post(
                "/oauth/token",
                data={"grant_type": GRANT_TYPE_TOKEN_EXCHANGE, "subject_token": subject_token},
            )

        with started("dev-idm", cwd=tmp_path, env=cli_env(), port=free_port()) as idm:
            idm.wait_until_answering("/.well-known/jwks.json")
            with httpx.Client(base_url=idm.url, timeout=10, trust_env=False) as http:
                accepted = exchange(http, "phrdev_cli-test")
                unknown = exchange(http, "not-a-development-token")
                jwks = http.get("/.well-known/jwks.json").json()
            code, stop_seconds = idm.terminate()

        assert accepted.status_code == 200, accepted.text
        body = accepted.json()
        assert body["token_type"] == "Bearer"
        claims = jwt.decode(body["access_token"], jwks, algorithms=["RS256"])
        assert claims["exp"] - claims["iat"] == body["expires_in"]
        assert {"sub", "jti"} <= claims.keys()
        assert unknown.status_code == 400, unknown.text
        assert unknown.json()["error"] == "invalid_grant"
        assert code == 0, idm.output
        assert stop_seconds < STOP_TIMEOUT
