"""The failure contract of reliability.md, driven with real faults: the development IdM as a real
HTTP server in its failure modes, and a real TCP proxy in front of it that can be cut.

Timing values are small (deadline ~1-2 s, cool-down 1 s, backoff 0.05 s) so the set stays fast;
the timing assertions are correctness bounds ("no request past its deadline", "a fast 503 does not
wait for anything"), with slack for a loaded machine, not benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.core.config import Region, Settings
from app.core.lifespan import Infra
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm, DevIdmMode
from app.main import create_app
from tests.conftest import Api, Env, make_settings
from tests.support.tcp_proxy import TcpProxy

# Fast, but with the same shape as production: retries with backoff, a circuit, a deadline.
FAST: dict[str, Any] = {
    "request_deadline_seconds": 2.0,
    "upstream_connect_timeout_seconds": 0.5,
    "upstream_timeout_seconds": 1.0,
    "upstream_retries": 2,
    "upstream_backoff_base_seconds": 0.05,
    "upstream_backoff_max_seconds": 0.2,
    "retry_after_cap_seconds": 1.0,
    "circuit_failure_threshold": 5,
    "circuit_cooldown_seconds": 1.0,
    "rejected_retry_seconds": 1,
}
# "Fast": no upstream call and no sleep, only process memory and Redis. Judged on the median so
# that one scheduling hiccup on a loaded machine does not fail the run; any single request over
# SLOW_SECONDS would mean it waited for something (a timeout, the deadline) and fails it.
FAST_SECONDS = 0.05
SLOW_SECONDS = 1.0


@dataclass
class Replica:
    app: FastAPI
    http: httpx.AsyncClient
    api: Api

    @property
    def infra(self) -> Infra:
        infra: Infra = self.app.state.infra
        return infra


def tuned(env: Env, **overrides: Any) -> Settings:
    """The test's settings (its database, Redis prefix, IdM) with overrides, validated again."""
    return make_settings(**{**env.settings.model_dump(), **FAST, **overrides})


@asynccontextmanager
async def running(settings: Settings, admin_key: str) -> AsyncIterator[Replica]:
    """One app instance (a replica) with its own lifespan, broker, caches and circuit state."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenvend.test") as http:
            yield Replica(app, http, Api(http, admin_key))
        # Write the audit trail now rather than at shutdown: `AuditLog.stop` cancels a flush in
        # progress, which on SQLite can leave the write lock held and fail the final flush.
        await app.state.infra.audit.flush()


async def vend(
    http: httpx.AsyncClient, headers: dict[str, str], **params: str | int
) -> httpx.Response:
    return await http.get("/v1/teams/acme/token", params=params, headers=headers)


async def timed_vend(
    http: httpx.AsyncClient, headers: dict[str, str], **params: str | int
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await vend(http, headers, **params)
    return r, time.monotonic() - started


async def eventually(condition: Callable[[], bool], within: float) -> None:
    """Poll `condition()` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def settle(infra: Infra) -> None:
    """Wait until no exchange is in flight (one abandoned by its callers runs on, shielded)."""
    await eventually(lambda: infra.broker.inflight == 0, within=5.0)


async def cached(infra: Infra, team: str = "acme", name: str = "default") -> bool:
    cred = await infra.directory.find(team, name)
    return await infra.cache.get_shared(cred.id, cred.version) is not None


async def setup_team(replica: Replica, credentials: int = 1) -> dict[str, str]:
    """Team `acme` with credentials `default`, `c1`...; the headers of a client granted it."""
    await replica.api.team()
    await replica.api.credential()
    for i in range(1, credentials):
        await replica.api.credential(name=f"c{i}")
    _, client = await replica.api.client(["acme"])
    return client


def assert_fast(latencies: list[float]) -> None:
    assert statistics.median(latencies) < FAST_SECONDS, latencies
    assert max(latencies) < SLOW_SECONDS, latencies


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code


class TestSlowUpstream:
    async def test_a_slow_upstream_gets_504_at_the_deadline_and_nothing_is_cached(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, request_deadline_seconds=1.0, upstream_timeout_seconds=1.5)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(delay_ms=3000)

            r, elapsed = await timed_vend(replica.http, client)

            assert_problem(r, 504, "upstream-timeout")
            assert 0.95 <= elapsed < 1.0 + 0.4, elapsed
            # The abandoned exchange runs on, shielded, until the client's own timeout (1.5 s).
            await settle(replica.infra)
            assert idm.requests == 1  # its deadline had passed: no retry
            assert not await cached(replica.infra)
            idm.set_mode(DevIdmMode())
            after = await vend(replica.http, client)
            assert after.json()["cache"] == "miss"

    async def test_retries_of_timed_out_attempts_stop_at_the_deadline(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(
            env,
            request_deadline_seconds=1.0,
            upstream_timeout_seconds=0.3,
            upstream_retries=10,
            circuit_failure_threshold=100,
        )
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(delay_ms=2000)

            r, elapsed = await timed_vend(replica.http, client)

            assert_problem(r, 504, "upstream-timeout")
            assert elapsed < 1.0 + 0.4, elapsed
            await settle(replica.infra)
            # 0.3 s per attempt and a little backoff: two to four attempts fit in one second,
            # and none is started once the deadline has passed.
            assert 2 <= idm.requests <= 4, idm.requests
            assert not await cached(replica.infra)


class TestUpstreamErrors:
    async def test_5xx_is_retried_a_bounded_number_of_times_then_503_with_retry_after(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, circuit_failure_threshold=100)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=503)

            r, elapsed = await timed_vend(replica.http, client)

            assert_problem(r, 503, "upstream-unavailable")
            assert int(r.headers["retry-after"]) >= 1
            assert idm.requests == 1 + settings.upstream_retries
            # Full jitter: each wait is at most base * 2**attempt (0.05 + 0.1 here).
            assert elapsed < 0.15 + 0.5, elapsed
            assert not await cached(replica.infra)

    async def test_backoff_never_waits_past_the_deadline(self, env: Env, idm: DevIdm) -> None:
        settings = tuned(
            env,
            request_deadline_seconds=1.0,
            upstream_retries=10,
            upstream_backoff_base_seconds=0.2,
            upstream_backoff_max_seconds=1.0,
            circuit_failure_threshold=100,
        )
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=500)

            r, elapsed = await timed_vend(replica.http, client)

            # A wait that would end past the deadline is not taken: the loop gives up with 503
            # (504 only if an attempt started just before the deadline was cut by it).
            assert r.status_code in (503, 504), r.text
            assert elapsed < 1.0 + 0.3, elapsed
            assert 2 <= idm.requests <= 1 + settings.upstream_retries

    async def test_the_circuit_opens_fails_fast_and_lets_one_probe_through_after_cooldown(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env)  # threshold 5, cool-down 1 s, 2 retries
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica, credentials=21)
            names = [f"c{i}" for i in range(1, 21)]
            idm.set_mode(fail_status=502)

            first = await vend(replica.http, client)
            assert_problem(first, 503, "upstream-unavailable")
            assert idm.requests == 3
            second = await vend(replica.http, client)
            opened_at = time.monotonic()
            # Failures 4 and 5 open the circuit; the second retry is refused by it.
            assert_problem(second, 503, "upstream-unavailable")
            assert idm.requests == 5

            latencies = []
            for name in ["default", *names]:
                r, elapsed = await timed_vend(replica.http, client, credential=name)
                assert_problem(r, 503, "upstream-unavailable")
                assert r.headers["retry-after"] == "1"  # the remaining cool-down, rounded up
                latencies.append(elapsed)
            assert_fast(latencies)
            assert idm.requests == 5  # nothing reached the upstream while open

            # Half-open: of 20 concurrent misses (20 credentials, so single flight cannot merge
            # them) exactly one reaches the upstream. It fails: open again.
            await asyncio.sleep(max(0.0, opened_at + 1.0 + 0.1 - time.monotonic()))
            probes = await asyncio.gather(
                *(vend(replica.http, client, credential=n) for n in names)
            )
            assert [r.status_code for r in probes] == [503] * 20
            assert idm.requests == 6
            reopened_at = time.monotonic()
            latencies = []
            for name in names[:5]:
                r, elapsed = await timed_vend(replica.http, client, credential=name)
                assert r.status_code == 503
                latencies.append(elapsed)
            assert_fast(latencies)
            assert idm.requests == 6

            # The upstream recovers; after the next cool-down one probe succeeds and closes it.
            # It is slow, so all 20 callers arrive while it is still in flight.
            idm.set_mode(delay_ms=500)
            await asyncio.sleep(max(0.0, reopened_at + 1.0 + 0.1 - time.monotonic()))
            probes = await asyncio.gather(
                *(vend(replica.http, client, credential=n) for n in names)
            )
            statuses = sorted(r.status_code for r in probes)
            assert statuses == [200] + [503] * 19, statuses
            assert idm.requests == 7
            idm.set_mode(DevIdmMode())
            closed = await asyncio.gather(
                *(vend(replica.http, client, credential=n) for n in names)
            )
            assert [r.status_code for r in closed] == [200] * 20
            assert idm.exchanges == 20  # the probe's JWT was cached, the 19 others exchanged
            assert idm.requests == 7 + 19

    @pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
    async def test_a_replica_sees_the_circuit_another_replica_opened(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, upstream_retries=0, circuit_failure_threshold=2)
        async with (
            running(settings, env.admin_key) as first,
            running(settings, env.admin_key) as second,
        ):
            client = await setup_team(first, credentials=2)
            idm.set_mode(fail_status=500)
            for _ in range(2):
                assert (await vend(first.http, client)).status_code == 503
            assert idm.requests == 2

            # The second replica has failed nothing itself, and its cache is cold.
            r = await vend(second.http, client, credential="c1")

            assert_problem(r, 503, "upstream-unavailable")
            latencies = []
            for _ in range(5):
                r, elapsed = await timed_vend(second.http, client, credential="c1")
                assert r.status_code == 503
                latencies.append(elapsed)
            assert_fast(latencies)
            assert idm.requests == 2


class TestRateLimitedUpstream:
    async def test_retry_after_is_waited_for_before_the_retry(self, env: Env, idm: DevIdm) -> None:
        settings = tuned(env, retry_after_cap_seconds=5.0, request_deadline_seconds=3.0)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=429, retry_after=1, fail_times=1)

            r, elapsed = await timed_vend(replica.http, client)

            assert r.status_code == 200, r.text
            assert r.json()["cache"] == "miss"
            assert 0.95 <= elapsed < 1.0 + 0.5, elapsed  # Retry-After, not the 0.05 s backoff
            assert (idm.requests, idm.exchanges) == (2, 1)

    async def test_retry_after_is_capped(self, env: Env, idm: DevIdm) -> None:
        settings = tuned(env, retry_after_cap_seconds=0.3, request_deadline_seconds=3.0)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=429, retry_after=30, fail_times=1)

            r, elapsed = await timed_vend(replica.http, client)

            assert r.status_code == 200, r.text
            assert 0.28 <= elapsed < 0.3 + 0.5, elapsed
            assert (idm.requests, idm.exchanges) == (2, 1)

    async def test_retry_after_beyond_the_deadline_means_no_retry(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, retry_after_cap_seconds=10.0, request_deadline_seconds=2.0)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=429, retry_after=5)

            r, elapsed = await timed_vend(replica.http, client)

            assert_problem(r, 503, "upstream-unavailable")
            assert r.headers["retry-after"] == "5"  # the upstream's, passed on to the caller
            assert elapsed < 0.5, elapsed  # gave up at once instead of sleeping into the deadline
            assert idm.requests == 1

    async def test_a_rate_limited_upstream_sees_no_retry_storm(self, env: Env, idm: DevIdm) -> None:
        settings = tuned(
            env,
            retry_after_cap_seconds=0.4,
            request_deadline_seconds=0.7,
            circuit_failure_threshold=3,
            circuit_cooldown_seconds=10.0,
        )
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(fail_status=429, retry_after=30)

            storm = await asyncio.gather(*(vend(replica.http, client) for _ in range(50)))

            assert [r.status_code for r in storm] == [503] * 50
            # One flight for all 50: one call, one retry after the (capped) Retry-After of
            # 0.4 s, then a second wait would end past the 0.7 s deadline.
            assert idm.requests == 2
            for _ in range(20):
                assert (await vend(replica.http, client)).status_code == 503
            # The third failure opens the circuit; nothing more reaches the upstream until the
            # cool-down ends (then one probe per cool-down).
            assert idm.requests == settings.circuit_failure_threshold


GARBAGE_MARKERS = ["<html", "Sign in", "padding", "xxxxxxxx", "eyJ", "redirect-target", "_dev"]


class TestGarbage:
    @pytest.mark.parametrize(
        "garbage", ["html", "huge", "missing-fields", "bad-expires", "redirect"]
    )
    async def test_garbage_is_502_not_cached_and_not_echoed(
        self, env: Env, idm: DevIdm, garbage: str
    ) -> None:
        settings = tuned(env, circuit_failure_threshold=100)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(garbage=garbage)

            r = await vend(replica.http, client)

            assert_problem(r, 502, "upstream-bad-response")
            for marker in GARBAGE_MARKERS:
                assert marker not in r.text, marker
            assert idm.requests == 1 + settings.upstream_retries
            assert idm.redirect_target_hits == 0  # a redirect is never followed
            assert not await cached(replica.infra)
            idm.set_mode(DevIdmMode())
            after = await vend(replica.http, client)
            assert after.status_code == 200
            assert after.json()["cache"] == "miss"
            assert idm.exchanges == 1


async def audit_events(replica: Replica, action: str) -> list[dict[str, Any]]:
    await replica.infra.audit.flush()
    r = await replica.http.get(
        "/v1/audit-events", params={"action": action, "team": "acme"}, headers=replica.api.admin
    )
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


async def credential_view(replica: Replica, name: str = "default") -> dict[str, Any]:
    r = await replica.http.get(f"/v1/teams/acme/credentials/{name}", headers=replica.api.admin)
    assert r.status_code == 200, r.text
    return dict(r.json())


class TestRejectedCredential:
    async def test_rejection_is_negative_cached_retried_once_after_a_while_and_recovers(
        self, env: Env, idm: DevIdm
    ) -> None:
        async with running(tuned(env), env.admin_key) as replica:
            await replica.api.team()
            token = await replica.api.credential()
            _, client = await replica.api.client(["acme"])
            idm.revoke(token)

            r, elapsed = await timed_vend(replica.http, client)

            assert_problem(r, 424, "credential-rejected")
            assert elapsed < 0.5
            assert idm.requests == 1  # never retried
            view = await credential_view(replica)
            assert view["status"] == "rejected"
            assert view["last_error"]["code"] == "invalid_grant"
            at = dt.datetime.fromisoformat(view["last_error"]["at"])
            assert abs((dt.datetime.now(dt.UTC) - at).total_seconds()) < 5
            for _ in range(10):
                assert_problem(await vend(replica.http, client), 424, "credential-rejected")
            assert idm.requests == 1  # negative-cached

            await asyncio.sleep(1.1)  # rejected_retry_seconds
            assert_problem(await vend(replica.http, client), 424, "credential-rejected")
            assert idm.requests == 2  # exactly one more look
            for _ in range(10):
                assert (await vend(replica.http, client)).status_code == 424
            assert idm.requests == 2

            idm.register(token)  # fixed on Phrase's side: the same API token works again
            await asyncio.sleep(1.1)
            r = await vend(replica.http, client)

            assert r.status_code == 200, r.text
            assert idm.requests == 3
            view = await credential_view(replica)
            assert view["status"] == "active"
            assert view["last_error"] is None
            rejected = await audit_events(replica, "credential.rejected")
            recovered = await audit_events(replica, "credential.recovered")
            # Once each, though the IdM refused the token twice.
            assert [e["outcome"] for e in rejected] == ["invalid_grant"]
            assert len(recovered) == 1
            assert recovered[0]["at"] > rejected[0]["at"]

    async def test_rotating_a_rejected_credential_clears_the_negative_cache_at_once(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(env, rejected_retry_seconds=3600)
        async with running(settings, env.admin_key) as replica:
            await replica.api.team()
            await replica.api.credential(api_token="not-a-phrase-token")
            _, client = await replica.api.client(["acme"])
            assert (await vend(replica.http, client)).status_code == 424

            r = await replica.http.put(
                "/v1/teams/acme/credentials/default/api-token",
                json={"api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"},
                headers=replica.api.admin,
            )
            assert r.status_code == 200
            assert r.json()["status"] == "active"
            after = await vend(replica.http, client)

            assert after.status_code == 200, after.text
            assert (idm.requests, idm.exchanges) == (2, 1)


class IdmFault:
    """Puts the IdM in one failure mode; `closed-port` cuts the TCP proxy in front of it."""

    def __init__(self, idm: DevIdm, proxy: TcpProxy) -> None:
        self.idm, self.proxy = idm, proxy

    def apply(self, fault: str) -> None:
        match fault:
            case "slow":
                self.idm.set_mode(delay_ms=5000)
            case "5xx":
                self.idm.set_mode(fail_status=503)
            case "429":
                self.idm.set_mode(fail_status=429, retry_after=1)
            case "garbage":
                self.idm.set_mode(garbage="html")
            case "closed-port":
                self.proxy.cut("refuse")
            case "hung-port":
                self.proxy.cut("hang")
            case _:
                raise AssertionError(fault)


@pytest.fixture
def idm_proxy(dev_idm_server: tuple[DevIdm, str]) -> Iterator[TcpProxy]:
    parts = urlsplit(dev_idm_server[1])
    assert parts.hostname is not None
    assert parts.port is not None
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


FAULTS = ["slow", "5xx", "429", "garbage", "closed-port", "hung-port"]


class TestServeWhileValid:
    @pytest.mark.parametrize("fault", FAULTS)
    async def test_a_cached_jwt_meeting_min_ttl_is_served_whatever_the_upstream_does(
        self, env: Env, idm: DevIdm, idm_proxy: TcpProxy, fault: str
    ) -> None:
        url = f"http://127.0.0.1:{idm_proxy.port}"
        settings = tuned(env, phrase_eu_url=url, phrase_us_url=url)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            warm = await vend(replica.http, client)
            assert warm.status_code == 200, warm.text
            IdmFault(idm, idm_proxy).apply(fault)

            latencies = []
            for _ in range(20):
                r, elapsed = await timed_vend(replica.http, client, min_ttl=600)
                assert r.status_code == 200, r.text
                assert r.json()["cache"] == "hit"
                assert r.json()["access_token"] == warm.json()["access_token"]
                latencies.append(elapsed)
            assert_fast(latencies)
            assert idm.requests == 1

    @pytest.mark.parametrize("fault", ["5xx", "closed-port"])
    async def test_a_cached_jwt_shorter_than_min_ttl_is_not_served_when_the_upstream_fails(
        self, env: Env, idm: DevIdm, idm_proxy: TcpProxy, fault: str
    ) -> None:
        url = f"http://127.0.0.1:{idm_proxy.port}"
        settings = tuned(env, phrase_eu_url=url, phrase_us_url=url)
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica)
            idm.set_mode(expires_in=1200)
            assert (await vend(replica.http, client, min_ttl=0)).status_code == 200
            IdmFault(idm, idm_proxy).apply(fault)

            r = await vend(replica.http, client, min_ttl=1800)

            assert_problem(r, 503, "upstream-unavailable")
            ok = await vend(replica.http, client, min_ttl=600)
            assert ok.status_code == 200
            assert ok.json()["cache"] == "hit"


def established(port: int) -> int:
    """This process's descriptors on established TCP connections to or from `port` (Linux)."""
    fd_dir = "/proc/self/fd"
    inodes = set()
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            ports = {int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)}
            if fields[9] in inodes and fields[3] == "01" and port in ports:
                count += 1
    return count


def other_fds() -> int:
    """Descriptors that are not sockets (files, pipes, event fds)."""
    fd_dir = "/proc/self/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            count += not os.readlink(f"{fd_dir}/{fd}").startswith("socket:[")
    return count


async def lock_keys(env: Env) -> list[bytes]:
    if env.settings.redis_url is None:
        return []
    redis = Redis.from_url(env.settings.redis_url.get_secret_value())
    try:
        return [k async for k in redis.scan_iter(match=f"{env.settings.redis_prefix}*:lock")]
    finally:
        await redis.aclose()


UPSTREAM_FAILURE_CODES = {"upstream-unavailable", "upstream-timeout", "upstream-bad-response"}


class TestResourceBounds:
    async def test_after_500_failing_requests_nothing_is_left_in_flight(
        self, env: Env, idm: DevIdm
    ) -> None:
        settings = tuned(
            env,
            request_deadline_seconds=0.5,
            upstream_timeout_seconds=0.3,
            upstream_retries=1,
            upstream_backoff_base_seconds=0.01,
            circuit_failure_threshold=1000,
        )
        async with running(settings, env.admin_key) as replica:
            client = await setup_team(replica, credentials=10)
            names = ["default", *(f"c{i}" for i in range(1, 10))]
            modes = [
                DevIdmMode(fail_status=503),
                DevIdmMode(delay_ms=1000),
                DevIdmMode(garbage="html"),
                DevIdmMode(fail_status=429, retry_after=5),
                DevIdmMode(fail_status=500, delay_ms=50),
            ]

            async def round_of(n: int, mode: DevIdmMode) -> list[str]:
                idm.set_mode(mode)
                responses = await asyncio.gather(
                    *(vend(replica.http, client, credential=names[i % 10]) for i in range(n))
                )
                return [r.json()["code"] for r in responses]

            assert await round_of(50, modes[0])  # warm the pools before counting
            await settle(replica.infra)
            tasks_before, other_fds_before = len(asyncio.all_tasks()), other_fds()

            codes: list[str] = []
            for mode in modes:
                for _ in range(2):
                    codes += await round_of(50, mode)

            assert len(codes) == 500
            assert set(codes) <= UPSTREAM_FAILURE_CODES, set(codes)
            await settle(replica.infra)
            assert replica.infra.broker.inflight == 0
            assert await lock_keys(env) == []
            assert len(asyncio.all_tasks()) <= tasks_before + 2
            assert other_fds() <= other_fds_before + 2
            # Connections stay within their pools' bounds: the IdM client keeps at most 10 alive
            # (both ends are in this process, the IdM being a thread here), PostgreSQL 10 + 10.
            idm_port = int(urlsplit(settings.phrase_url(Region.EU)).port or 0)
            # The IdM's side of abandoned slow requests closes when its handler finishes.
            await eventually(lambda: established(idm_port) <= 2 * 10, within=3.0)
            assert established(5432) <= 20
            assert established(6379) <= 256 + 1  # redis-py's max_connections, and pub/sub
