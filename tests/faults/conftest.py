"""Process-level fault tests: real `tokenvend serve` processes, a redis-server each test owns and
can pause, kill and restart, a fresh PostgreSQL database per module, and the development IdM as a
real HTTP server that counts exchanges per API token.

Every test prints one `FIGURES ...` line (run pytest with `-s` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt as jose_jwt

from app.auth.keys import issue_key
from app.cli import upgrade_database
from app.core.crypto import Keyring
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm, create_dev_idm_app
from tests.fixtures.services import (
    asyncpg_url,
    fresh_database,
    require_redis,
)
from tests.support.processes import RedisServer, TokenvendServer, require_binary
from tests.support.servers import ServerThread

# The settings every fault test runs with, unless a test overrides them.
REQUEST_DEADLINE = 3.0
REDIS_TIMEOUT = 0.2


# --- the development IdM, counting per API token ---------------------------------------------


class CountingDevIdm(DevIdm):
    """The development IdM that also notes, per API token (as its SHA-256), when each JWT was
    issued: on arrival of the request, before any configured delay."""

    issued: list[tuple[float, str]]

    def reset(self, *, tokens: bool = False) -> None:
        super().reset(tokens=tokens)
        self.issued = []

    def answer(
        self, content_type: str, accept: str, body: bytes, *, redirect_url: str
    ) -> tuple[float, Any]:
        before = self.exchanges
        delay, response = super().answer(content_type, accept, body, redirect_url=redirect_url)
        if self.exchanges > before and self.last_request is not None:
            self.issued.append((time.monotonic(), self.last_request.fields["subject_token"]))
        return delay, response

    def exchanges_for(
        self, api_token: str, since: float = float("-inf"), until: float = float("inf")
    ) -> int:
        digest = sha256(api_token)
        return sum(1 for at, d in list(self.issued) if d == digest and since <= at < until)


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def subject_of(api_token: str) -> str:
    """The `sub` the development IdM puts in JWTs exchanged for this API token."""
    return f"dev-{sha256(api_token)[:24]}"


def new_api_token() -> str:
    return f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def fault_idm_server() -> Iterator[tuple[CountingDevIdm, str]]:
    idm = CountingDevIdm()
    with ServerThread(create_dev_idm_app(idm)) as server:
        yield idm, server.url


@pytest.fixture
def fault_idm(fault_idm_server: tuple[CountingDevIdm, str]) -> Iterator[CountingDevIdm]:
    idm, _ = fault_idm_server
    idm.reset()
    yield idm
    idm.reset()


# --- PostgreSQL, keys, Redis, servers --------------------------------------------------------


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for the module, dropped afterwards."""
    with fresh_database("fault") as name:
        url = asyncpg_url(name)
        upgrade_database(url)
        yield url


@dataclass(frozen=True)
class Secrets:
    encryption_keys: str
    admin_key: str


@pytest.fixture(scope="module")
def server_secrets() -> Secrets:
    """Servers sharing the module's database must share its keyring."""
    return Secrets(Keyring.generate_spec("fault"), issue_key().key.get_secret_value())


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Logs, the Redis working directory, the metrics directory: removed even on failure."""
    with tempfile.TemporaryDirectory(prefix="tokenvend-fault-") as path:
        yield Path(path)


@pytest.fixture(scope="module")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    require_redis()  # the suite's own Redis: where this machine is meant to have one
    require_binary("redis-server")
    (workdir / "redis").mkdir()
    with RedisServer(workdir / "redis") as server:
        yield server


ServerFactory = Callable[..., TokenvendServer]


@pytest.fixture(scope="module")
def base_env(
    database_url: str,
    server_secrets: Secrets,
    redis_server: RedisServer,
    fault_idm_server: tuple[CountingDevIdm, str],
) -> dict[str, str]:
    _, idm_url = fault_idm_server
    return {
        "TOKENVEND_DATABASE_URL": database_url,
        "TOKENVEND_REDIS_URL": redis_server.url,
        "TOKENVEND_REDIS_PREFIX": f"tokenvend:fault:{uuid.uuid4().hex[:12]}:",
        "TOKENVEND_ENCRYPTION_KEYS": server_secrets.encryption_keys,
        "TOKENVEND_BOOTSTRAP_ADMIN_KEY": server_secrets.admin_key,
        "TOKENVEND_PHRASE_EU_URL": idm_url,
        "TOKENVEND_PHRASE_US_URL": idm_url,
        "TOKENVEND_REQUEST_DEADLINE_SECONDS": str(REQUEST_DEADLINE),
        "TOKENVEND_REDIS_TIMEOUT_SECONDS": str(REDIS_TIMEOUT),
        # Load tests, not rate-limit tests: one client key drives all the load.
        "TOKENVEND_RATE_LIMIT_PER_SECOND": "100000",
        "TOKENVEND_RATE_LIMIT_BURST": "1000000",
        "TOKENVEND_LOG_FORMAT": "console",
        "TOKENVEND_LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="module")
def start_server(workdir: Path, base_env: dict[str, str]) -> Iterator[ServerFactory]:
    """`start_server(name="a", workers=1, **env)` starts a `tokenvend serve`; all are stopped
    when the module is done, pass or fail. Starting one costs seconds (imports), so a module's
    tests may share servers; each then names its own teams."""
    started: list[TokenvendServer] = []

    def start(name: str = "tokenvend", workers: int = 1, **env: str) -> TokenvendServer:
        server = TokenvendServer(workdir, {**base_env, **env}, workers=workers, name=name)
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


def start_servers(factory: ServerFactory, names: Sequence[str], **env: str) -> list[Any]:
    """Start several servers at once (each start mostly waits for imports)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda n: factory(name=n, **env), names))


# --- the admin API over HTTP -----------------------------------------------------------------


class Admin:
    def __init__(self, base_url: str, admin_key: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {admin_key}"}

    async def _call(self, method: str, path: str, expect: int, **kwargs: Any) -> Any:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10.0) as http:
            r = await http.request(method, path, headers=self.headers, **kwargs)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    async def team(self, slug: str) -> None:
        await self._call("POST", "/v1/teams", 201, json={"slug": slug})

    async def credential(self, team: str, api_token: str, name: str = "default") -> None:
        body = {"name": name, "region": "eu", "api_token": api_token}
        await self._call("POST", f"/v1/teams/{team}/credentials", 201, json=body)

    async def rotate(self, team: str, api_token: str, name: str = "default") -> None:
        path = f"/v1/teams/{team}/credentials/{name}/api-token"
        await self._call("PUT", path, 200, json={"api_token": api_token})

    async def client(self, teams: list[str]) -> dict[str, str]:
        body = {"name": f"load-{uuid.uuid4().hex[:6]}", "role": "client", "teams": teams}
        created = await self._call("POST", "/v1/clients", 201, json=body)
        return {"Authorization": f"Bearer {created['api_key']}"}


# --- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    path: str
    params: dict[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    label: str
    started: float  # time.monotonic()
    latency: float
    status: int  # 0: transport error
    wall: float  # time.time() when the response arrived
    token: str | None
    code: str | None = None  # the problem's `code` of an error response

    @property
    def ended(self) -> float:
        return self.started + self.latency

    def claims(self) -> dict[str, Any]:
        assert self.token is not None
        claims: dict[str, Any] = jose_jwt.get_unverified_claims(self.token)
        return claims


def token_path(team: str) -> str:
    return f"/v1/teams/{team}/token"


class LoadClient:
    """httpx.AsyncClients whose connection limits add up to the concurrency, `per_client` each:
    one client with hundreds of connections spends seconds in its own pool bookkeeping (300
    requests at once against a hello-world server take about 6 s through one client and under 1 s
    through thirty), which would be measured as server latency. Caller `i` uses `self[i]`."""

    def __init__(self, base_url: str, concurrency: int, per_client: int = 10) -> None:
        shares = [per_client] * (concurrency // per_client)
        if concurrency % per_client:
            shares.append(concurrency % per_client)
        self._clients = [
            httpx.AsyncClient(
                base_url=base_url,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                # Far beyond the server's deadline: an overrun is measured, not cut short.
                timeout=30.0,
            )
            for n in shares
        ]

    def __getitem__(self, caller: int) -> httpx.AsyncClient:
        return self._clients[caller % len(self._clients)]

    async def connect(self, n: int) -> None:
        """Open `n` connections before a burst, so that it measures the server, not handshakes."""
        await asyncio.gather(*(self[i].get("/healthz") for i in range(n)))

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.aclose() for c in self._clients))


async def request_once(http: httpx.AsyncClient, target: Target, headers: dict[str, str]) -> Sample:
    started, wall_started = time.monotonic(), time.time()
    try:
        r = await http.get(target.path, params=target.params, headers=headers)
    except httpx.TransportError:
        latency = time.monotonic() - started
        return Sample(target.label, started, latency, 0, wall_started + latency, None)
    latency = time.monotonic() - started
    body = r.json()
    if r.status_code == 200:
        return Sample(target.label, started, latency, 200, time.time(), body["access_token"])
    code = body.get("code") if isinstance(body, dict) else None
    return Sample(target.label, started, latency, r.status_code, time.time(), None, code)


async def steady_load(
    load: LoadClient,
    targets: Callable[[], Sequence[Target]],
    headers: dict[str, str],
    *,
    clients: int,
    stop: asyncio.Event,
    pause: float = 0.0,
) -> list[Sample]:
    """`clients` callers, each asking in turn for every target `targets()` names at that moment,
    until `stop` is set; `pause` seconds between a caller's requests leave CPU to the rest."""
    samples: list[Sample] = []

    async def caller(n: int) -> None:
        i = n
        while not stop.is_set():
            current = targets()
            samples.append(await request_once(load[n], current[i % len(current)], headers))
            i += 1
            if pause:
                await asyncio.sleep(pause)

    await asyncio.gather(*(caller(n) for n in range(clients)))
    return samples


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for `condition`, which another thread (the IdM's) makes true: polled, since an
    asyncio.Event cannot be set from there without the loop's cooperation."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def until_ready(base_url: str, within: float = 10.0) -> None:
    """Wait until the server's /readyz says `ok`: its database answers and it uses Redis again
    (a replica that recently saw Redis fail skips it for a while)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as http:

        async def ok() -> bool:
            with contextlib.suppress(httpx.TransportError, ValueError):
                return bool((await http.get("/readyz")).json().get("status") == "ok")
            return False

        async with asyncio.timeout(within):
            while True:
                if await ok():
                    return
                await asyncio.sleep(0.1)


async def burst(load: LoadClient, target: Target, headers: dict[str, str], n: int) -> list[Sample]:
    """`n` requests at once."""
    return list(await asyncio.gather(*(request_once(load[i], target, headers) for i in range(n))))


async def watch_readyz(
    http: httpx.AsyncClient,
    stop: asyncio.Event,
    seen: list[tuple[float, str]],
    interval: float = 0.1,
) -> None:
    """Append (monotonic time, `status` field or what went wrong) to `seen` every `interval`
    until `stop`; the caller reads `seen` while this runs."""
    while not stop.is_set():
        try:
            r = await http.get("/readyz", timeout=5.0)
            status = r.json().get("status", f"http {r.status_code}")
        except httpx.TransportError as exc:
            status = type(exc).__name__
        seen.append((time.monotonic(), str(status)))
        await asyncio.sleep(interval)


def statuses(samples: Sequence[Sample]) -> dict[int | str, int]:
    """Counts by status; errors by `status:code`, so a summary says what went wrong."""
    return dict(
        sorted(
            Counter(
                s.status if s.code is None else f"{s.status}:{s.code}" for s in samples
            ).items(),
            key=str,
        )
    )


def worst_latency(samples: Sequence[Sample]) -> float:
    return max((s.latency for s in samples), default=0.0)


def figures(test: str, **values: object) -> str:
    """The one-line summary every fault test prints."""
    parts = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    line = f"FIGURES {test}: {parts}"
    print(f"\n{line}")
    return line


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace(" ", "")
