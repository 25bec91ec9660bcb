"""SIGTERM under load: in-flight requests finish, the audit buffer is flushed, exit code 0."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from app.auth.keys import issue_key
from app.core.crypto import Keyring
from app.integrations.phrase.dev_idm import DevIdm, DevIdmMode
from tests.conftest import truncate
from tests.fixtures.services import REDIS_URL, require_redis
from tests.support.processes import TokenvendServer

IN_FLIGHT = 60


async def test_sigterm_lets_in_flight_requests_finish_and_flushes_the_audit(
    postgres_url: str, dev_idm_server: tuple[DevIdm, str], tmp_path: Path
) -> None:
    require_redis()
    idm, idm_url = dev_idm_server
    idm.reset()
    plain_pg = postgres_url.replace("+asyncpg", "")
    await truncate(postgres_url)
    admin = issue_key().key.get_secret_value()
    env = {
        "TOKENVEND_DATABASE_URL": postgres_url,
        "TOKENVEND_REDIS_URL": REDIS_URL,
        "TOKENVEND_REDIS_PREFIX": f"tokenvend:test:{uuid.uuid4().hex[:12]}:",
        "TOKENVEND_ENCRYPTION_KEYS": Keyring.generate_spec("k"),
        "TOKENVEND_BOOTSTRAP_ADMIN_KEY": admin,
        "TOKENVEND_PHRASE_EU_URL": idm_url,
        "TOKENVEND_LOG_LEVEL": "WARNING",
    }
    server = TokenvendServer(tmp_path, env)
    server.start()
    try:
        async with httpx.AsyncClient(
            base_url=server.url, timeout=15, limits=httpx.Limits(max_connections=IN_FLIGHT + 10)
        ) as http:
            headers = {"Authorization": f"Bearer {admin}"}
            await http.post("/v1/teams", json={"slug": "acme"}, headers=headers)
            await http.post(
                "/v1/teams/acme/credentials",
                json={"region": "eu", "api_token": "phrdev_shutdown_token_01"},
                headers=headers,
            )
            # Cold credential, slow upstream: every request below is in flight for ~2.5 s.
            idm.set_mode(DevIdmMode(delay_ms=2500))
            requests = [
                asyncio.create_task(http.get("/v1/teams/acme/token", headers=headers))
                for _ in range(IN_FLIGHT)
            ]
            await asyncio.sleep(1.0)  # all sent and accepted, all waiting for the exchange
            stopped_at = time.monotonic()
            server.signal(signal.SIGTERM)
            responses = await asyncio.gather(*requests, return_exceptions=True)
            after = await _try(http, headers)
    finally:
        exit_code = await asyncio.to_thread(_wait, server)
    elapsed = time.monotonic() - stopped_at
    statuses = [
        r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in responses
    ]
    audited = await _count_vends(plain_pg)
    print(
        f"graceful shutdown: in_flight={IN_FLIGHT} ok={statuses.count(200)} "
        f"errors={IN_FLIGHT - statuses.count(200)} exit={exit_code} stop_seconds={elapsed:.2f} "
        f"audited_vends={audited} request_after_sigterm={after}"
    )
    assert statuses == [200] * IN_FLIGHT
    assert exit_code == 0
    assert audited == IN_FLIGHT  # the buffer was flushed before the process ended
    assert after != 200  # no new work after SIGTERM
    assert idm.exchanges == 1


async def _try(http: httpx.AsyncClient, headers: dict[str, str]) -> int | str:
    try:
        return (await http.get("/v1/teams/acme/token", headers=headers)).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


def _wait(server: TokenvendServer) -> int | None:
    assert server.process is not None
    try:
        return server.process.wait(timeout=25)
    finally:
        server.stop()


async def _count_vends(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE action = 'token.vend' AND outcome = 'ok'"
        )
        return count
    finally:
        await conn.close()
