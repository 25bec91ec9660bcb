"""The broker on a real three-master Redis Cluster, with two tokenvend processes sharing it."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jose import jwt as jose_jwt

from app.auth.keys import issue_key
from app.core.crypto import Keyring
from app.integrations.phrase.dev_idm import DevIdm, DevIdmMode
from tests.conftest import truncate
from tests.fixtures.services import require_redis
from tests.support.processes import TokenvendServer


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too; Redis needs it <= 55535."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (OSError, httpx.HTTPError, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_redis()  # redis-server must be installed and runnable: same rule as the shared one
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed for the cluster test", pytrace=False)
    base = tmp_path_factory.mktemp("cluster")
    ports: list[int] = []
    while len(ports) < 3:
        if (port := free_cluster_port()) not in ports:
            ports.append(port)
    procs = []
    try:
        for port in ports:
            node = base / str(port)
            node.mkdir()
            procs.append(
                subprocess.Popen(
                    [
                        "redis-server",
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(node),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            wait_until(
                lambda p=port: (
                    subprocess.run(
                        ["redis-cli", "-p", str(p), "ping"], capture_output=True, text=True
                    ).stdout.strip()
                    == "PONG"
                ),
                10,
                f"redis node {port}",
            )
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        wait_until(
            lambda: all(
                "cluster_state:ok"
                in subprocess.run(
                    ["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True, text=True
                ).stdout
                for p in ports
            ),
            20,
            "cluster_state:ok",
        )
        yield f"redis://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def servers(
    cluster: str,
    postgres_url: str,
    dev_idm_server: tuple[DevIdm, str],
    tmp_path: Path,
) -> Iterator[tuple[TokenvendServer, TokenvendServer, str, DevIdm]]:
    idm, idm_url = dev_idm_server
    idm.reset()
    asyncio.run(truncate(postgres_url))
    admin = issue_key().key.get_secret_value()
    env = {
        "TOKENVEND_DATABASE_URL": postgres_url,
        "TOKENVEND_REDIS_URL": cluster,
        "TOKENVEND_REDIS_CLUSTER": "true",
        "TOKENVEND_REDIS_PREFIX": f"tokenvend:cluster:{os.getpid()}:{time.monotonic_ns()}:",
        "TOKENVEND_ENCRYPTION_KEYS": Keyring.generate_spec("cluster"),
        "TOKENVEND_BOOTSTRAP_ADMIN_KEY": admin,
        "TOKENVEND_PHRASE_EU_URL": idm_url,
        "TOKENVEND_PHRASE_US_URL": idm_url,
        "TOKENVEND_LOG_LEVEL": "WARNING",
    }
    with (
        TokenvendServer(tmp_path, env, name="a") as a,
        TokenvendServer(tmp_path, env, name="b") as b,
    ):
        yield a, b, admin, idm


async def seed(url: str, admin: str) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        assert (await http.post("/v1/teams", json={"slug": "acme"})).status_code == 201
        r = await http.post(
            "/v1/teams/acme/credentials",
            json={"region": "eu", "api_token": "phrdev_cluster_token_one"},
        )
        assert r.status_code == 201
        r = await http.post("/v1/clients", json={"name": "svc", "teams": ["acme"]})
        return {"Authorization": f"Bearer {r.json()['api_key']}"}


class TestRedisCluster:
    async def test_miss_hit_and_single_flight_across_two_processes(
        self, servers: tuple[TokenvendServer, TokenvendServer, str, DevIdm]
    ) -> None:
        a, b, admin, idm = servers
        client = await seed(a.url, admin)
        idm.set_mode(DevIdmMode(delay_ms=300))
        # 150 at once per process: more commands in flight than TOKENVEND_REDIS_MAX_CONNECTIONS,
        # which must not cap the cluster client (it cannot wait; it would fail into degraded
        # mode and exchange under a local lock).
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(headers=client, timeout=10, limits=limits) as http:
            responses = await asyncio.gather(
                *(http.get(f"{s.url}/v1/teams/acme/token") for _ in range(150) for s in (a, b))
            )
            assert [r.status_code for r in responses] == [200] * 300
            tokens = {r.json()["access_token"] for r in responses}
            assert len(tokens) == 1, f"a:\n{a.log_tail()}\nb:\n{b.log_tail()}"
            assert idm.exchanges == 1
            again = await http.get(f"{b.url}/v1/teams/acme/token")
        assert again.json()["cache"] == "hit"
        assert idm.exchanges == 1

    async def test_rotation_through_one_process_is_seen_by_the_other(
        self, servers: tuple[TokenvendServer, TokenvendServer, str, DevIdm]
    ) -> None:
        a, b, admin, idm = servers
        client = await seed(a.url, admin)
        async with httpx.AsyncClient(headers=client, timeout=10) as http:
            before = (await http.get(f"{b.url}/v1/teams/acme/token")).json()["access_token"]
            r = await http.put(
                f"{a.url}/v1/teams/acme/credentials/default/api-token",
                json={"api_token": "phrdev_cluster_token_two"},
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert r.status_code == 200
            after = (await http.get(f"{b.url}/v1/teams/acme/token")).json()
        sub = jose_jwt.get_unverified_claims
        assert after["cache"] == "miss"
        assert sub(after["access_token"])["sub"] != sub(before)["sub"]
        assert idm.exchanges == 2

    async def test_eviction_through_one_process_reaches_the_other(
        self, servers: tuple[TokenvendServer, TokenvendServer, str, DevIdm]
    ) -> None:
        a, b, admin, idm = servers
        client = await seed(a.url, admin)
        async with httpx.AsyncClient(headers=client, timeout=10) as http:
            await http.get(f"{b.url}/v1/teams/acme/token")
            assert (await http.get(f"{b.url}/v1/teams/acme/token")).json()["cache"] == "hit"
            r = await http.delete(
                f"{a.url}/v1/teams/acme/token", headers={"Authorization": f"Bearer {admin}"}
            )
            assert r.json()["evicted"] is True
            assert (await http.get(f"{b.url}/v1/teams/acme/token")).json()["cache"] == "miss"
        assert idm.exchanges == 2
