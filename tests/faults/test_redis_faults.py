"""Redis hung (SIGSTOP), killed and restarted, under load, with real `tokenvend serve` processes.

The promise (docs/reliability.md, "Redis down, hung or cut off"): degrade, don't fail. Every request
is answered within its deadline while the upstream is healthy, `/readyz` says `degraded` while Redis
is gone and `ok` again within seconds of its return without a restart, at most one exchange per
process and credential while Redis is gone, and no replica serves a JWT of a rotated API token for
longer than the local trust bound (2 s; since every request now checks the cache generation in
Redis, a replica that cannot reach Redis reads the database at once, so the measured delay is far
below it).

The module's tests share two replicas, their Redis and their database; each names its own teams.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis import Redis as SyncRedis

from app.integrations.phrase.dev_idm import DevIdmMode
from tests.faults.conftest import (
    REQUEST_DEADLINE,
    Admin,
    CountingDevIdm,
    LoadClient,
    Sample,
    Secrets,
    ServerFactory,
    Target,
    figures,
    new_api_token,
    request_once,
    start_servers,
    statuses,
    steady_load,
    subject_of,
    token_path,
    until,
    until_ready,
    watch_readyz,
    worst_latency,
)
from tests.support.processes import RedisServer, TokenvendServer

CLIENTS = 20
WARM_ONLY_SECONDS = 1.0  # load on the warm credential before the fault
OUTAGE_SECONDS = 3.0
RECOVERY_BOUND = 5.0  # /readyz back to `ok` after Redis returns
AFTER_RECOVERY_SECONDS = 1.0
TRUST_SECONDS = 2.0  # the bound the contract allows (TOKENVEND_LOCAL_TRUST_SECONDS' old default)


@pytest.fixture(scope="module")
def replicas(start_server: ServerFactory) -> tuple[TokenvendServer, TokenvendServer]:
    """Two `tokenvend serve` processes sharing the module's PostgreSQL database and Redis; the
    single-replica tests run on `a`."""
    a, b = start_servers(start_server, ["a", "b"])
    return a, b


@pytest.fixture(autouse=True)
async def healthy(
    redis_server: RedisServer, replicas: tuple[TokenvendServer, TokenvendServer]
) -> AsyncIterator[None]:
    """Each test starts with Redis up and both replicas using it (none still skipping Redis
    after an earlier test's fault); whatever a test did, Redis and the replicas run afterwards."""
    await asyncio.gather(*(until_ready(r.url) for r in replicas))
    yield
    for replica in replicas:
        replica.resume()
    if redis_server.paused:
        redis_server.resume()
    if not redis_server.running:
        await asyncio.to_thread(redis_server.start)


def slug(name: str) -> str:
    """Tests of a module share its database: each names its own teams."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def sub(sample: Sample) -> str:
    return str(sample.claims()["sub"])


@dataclass
class Outage:
    samples: list[Sample]
    readyz: list[tuple[float, str]]
    final_readyz: dict[str, object]
    fault_at: float
    repaired_at: float
    readyz_ok_at: float | None
    warm_token: str
    cold_token: str
    late: Sample
    late_token: str


async def outage_under_load(
    server: TokenvendServer,
    admin_key: str,
    fault: Callable[[], Awaitable[None]],
    repair: Callable[[], Awaitable[None]],
) -> Outage:
    """Load on a warm credential; at the fault a cold one joins (first asked for while Redis is
    gone); repair after OUTAGE_SECONDS; run on until /readyz is `ok` again (RECOVERY_BOUND at
    most) plus AFTER_RECOVERY_SECONDS; then ask once for a credential nobody asked for yet."""
    admin = Admin(server.url, admin_key)
    teams = {name: slug(name) for name in ("warm", "cold", "late")}
    tokens = {name: new_api_token() for name in teams}
    for name, team in teams.items():
        await admin.team(team)
        await admin.credential(team, tokens[name])
    headers = await admin.client(list(teams.values()))
    warm, cold, late = (Target(n, token_path(teams[n])) for n in ("warm", "cold", "late"))

    async with LoadClient(server.url, CLIENTS) as load, LoadClient(server.url, 1) as probe:
        assert (await request_once(load[0], warm, headers)).status == 200
        targets: list[Target] = [warm]
        stop, stop_watch = asyncio.Event(), asyncio.Event()
        readyz: list[tuple[float, str]] = []
        running = asyncio.create_task(
            steady_load(load, lambda: targets, headers, clients=CLIENTS, stop=stop)
        )
        watch = asyncio.create_task(watch_readyz(probe[0], stop_watch, readyz))
        await asyncio.sleep(WARM_ONLY_SECONDS)

        fault_at = time.monotonic()
        await fault()
        targets.append(cold)
        await asyncio.sleep(OUTAGE_SECONDS)
        await repair()
        repaired_at = time.monotonic()

        ok_at = None
        while ok_at is None and time.monotonic() < repaired_at + RECOVERY_BOUND + 1:
            await asyncio.sleep(0.1)
            ok_at = next((t for t, s in readyz if t > repaired_at and s == "ok"), None)
        await asyncio.sleep(AFTER_RECOVERY_SECONDS)
        stop.set()
        samples = await running
        stop_watch.set()
        await watch
        final = (await probe[0].get("/readyz")).json()
        late_sample = await request_once(load[0], late, headers)

    return Outage(
        samples,
        readyz,
        final,
        fault_at,
        repaired_at,
        ok_at,
        tokens["warm"],
        tokens["cold"],
        late_sample,
        tokens["late"],
    )


def check_outage(
    name: str, run: Outage, redis: RedisServer, idm: CountingDevIdm, *, emptied: bool
) -> None:
    samples = run.samples
    during = [s for s in samples if run.fault_at <= s.started < run.repaired_at]
    readyz_during = sorted({s for t, s in run.readyz if run.fault_at <= t < run.repaired_at})
    exchanges = {
        label: {
            "before": idm.exchanges_for(token, until=run.fault_at),
            "outage": idm.exchanges_for(token, since=run.fault_at, until=run.repaired_at),
            "after": idm.exchanges_for(token, since=run.repaired_at),
        }
        for label, token in (("warm", run.warm_token), ("cold", run.cold_token))
    }
    recovery = None if run.readyz_ok_at is None else run.readyz_ok_at - run.repaired_at
    ok_at = run.readyz_ok_at or float("inf")
    degraded_again = sum(1 for t, s in run.readyz if t > ok_at and s != "ok")
    with SyncRedis.from_url(redis.url) as r:
        late_cached = any(r.scan_iter(match="*:jwt:*", count=1000)) and run.late.status == 200
    figures(
        name,
        requests=len(samples),
        during_outage=len(during),
        statuses=statuses(samples),
        worst_latency_s=worst_latency(samples),
        worst_latency_during_outage_s=worst_latency(during),
        readyz_during_outage=readyz_during,
        readyz_ok_after_s=recovery,
        readyz_not_ok_after_first_ok=degraded_again,
        final_readyz=run.final_readyz["status"],
        exchanges_warm=exchanges["warm"],
        exchanges_cold=exchanges["cold"],
        late_credential_exchanges=idm.exchanges_for(run.late_token),
    )

    assert statuses(samples) == {200: len(samples)}, "every request answered while the IdM is up"
    assert len(during) > 50, "the load ran through the outage"
    assert worst_latency(samples) < REQUEST_DEADLINE
    assert "degraded" in readyz_during, run.readyz
    assert recovery is not None, f"/readyz not ok within {RECOVERY_BOUND} s: {run.readyz[-5:]}"
    assert recovery <= RECOVERY_BOUND
    # One process: at most one exchange per credential while Redis was gone.
    assert exchanges["warm"]["before"] == 1
    assert exchanges["warm"]["outage"] <= 1
    assert exchanges["cold"]["before"] == 0
    assert exchanges["cold"]["outage"] == 1, "the cold credential was first asked for then"
    if not emptied:
        # Redis kept its entries: once back, at most the JWT exchanged meanwhile (in process
        # memory only, dropped when memory is flushed on recovery) is exchanged again.
        assert exchanges["warm"]["after"] == 0
        assert exchanges["cold"]["after"] <= 1
        assert degraded_again == 0, run.readyz
    # (After a restart the replica may flap for a second or two and exchange a credential
    # twice: reported in the figures, see the fault-test report, not asserted.)
    # Recovered without a restart: a credential first asked for now is exchanged once and
    # shared through Redis again.
    assert run.late.status == 200
    assert idm.exchanges_for(run.late_token) == 1
    assert late_cached


class TestRedisOutageUnderLoad:
    async def test_paused_redis_costs_no_request_and_recovers(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        server, _ = replicas

        async def pause() -> None:
            redis_server.pause()

        async def resume() -> None:
            redis_server.resume()

        run = await outage_under_load(server, server_secrets.admin_key, pause, resume)
        check_outage("redis_paused", run, redis_server, fault_idm, emptied=False)

    async def test_killed_and_restarted_redis_costs_no_request_and_recovers(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        server, _ = replicas

        async def kill() -> None:
            redis_server.kill()

        async def restart() -> None:
            await asyncio.to_thread(redis_server.start)  # the same port, empty

        run = await outage_under_load(server, server_secrets.admin_key, kill, restart)
        check_outage("redis_killed", run, redis_server, fault_idm, emptied=True)


async def served_by(
    load: LoadClient, target: Target, headers: dict[str, str], subject: str, within: float
) -> None:
    """Return once the replica behind `load` serves a JWT with `subject`, or after `within` s."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                s = await request_once(load[0], target, headers)
                if s.token and sub(s) == subject:
                    return
                await asyncio.sleep(0.05)


class TestRotationWhileCutOff:
    async def test_a_replica_cut_off_from_redis_serves_the_new_token_within_the_trust_bound(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        a, b = replicas
        admin = Admin(a.url, server_secrets.admin_key)
        team = slug("rot")
        old_token, new_token = new_api_token(), new_api_token()
        await admin.team(team)
        await admin.credential(team, old_token)
        headers = await admin.client([team])
        target = Target("rot", token_path(team))
        old_sub, new_sub = subject_of(old_token), subject_of(new_token)

        async with LoadClient(a.url, 1) as on_a, LoadClient(b.url, 4) as on_b:
            for http in (on_a[0], on_b[0], on_a[0], on_b[0]):  # warm on both, then from memory
                s = await request_once(http, target, headers)
                assert s.status == 200
                assert sub(s) == old_sub
            stop = asyncio.Event()
            load_b = asyncio.create_task(
                steady_load(on_b, lambda: [target], headers, clients=4, stop=stop, pause=0.01)
            )
            load_a = asyncio.create_task(
                steady_load(on_a, lambda: [target], headers, clients=1, stop=stop, pause=0.01)
            )
            await asyncio.sleep(0.3)
            redis_server.pause()
            paused_at = time.monotonic()
            await admin.rotate(team, new_token)  # asserts 200: the database is up
            rotated_at = time.monotonic()
            # Until B serves the new token (at most the trust bound and some), then on a little
            # to see it never goes back; then Redis returns and B must stay on the new token.
            await served_by(on_b, target, headers, new_sub, TRUST_SECONDS + 1.0)
            await asyncio.sleep(0.5)
            redis_server.resume()
            resumed_at = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            samples_b, samples_a = await load_b, await load_a

        first_new_b = min(s.ended for s in samples_b if s.status == 200 and sub(s) == new_sub)
        old_b = [s.ended for s in samples_b if s.status == 200 and sub(s) == old_sub]
        delay = first_new_b - rotated_at
        old_on_a_after = [s for s in samples_a if s.started >= rotated_at and sub(s) == old_sub]

        def new_jwts(samples: list[Sample]) -> int:
            """Distinct JWTs of the new token a replica served: its own exchanges."""
            return len({s.claims()["jti"] for s in samples if s.token and sub(s) == new_sub})

        paused_b = [s for s in samples_b if paused_at <= s.started < resumed_at]
        paused_a = [s for s in samples_a if paused_at <= s.started < resumed_at]
        figures(
            "rotation_cut_off",
            statuses_b=statuses(samples_b),
            statuses_a=statuses(samples_a),
            rotate_call_s=rotated_at - paused_at,
            b_first_new_jwt_after_rotation_returned_s=delay,
            b_first_new_jwt_after_pause_s=first_new_b - paused_at,
            b_old_jwts_after_rotation_returned=sum(1 for t in old_b if t > rotated_at),
            a_old_jwts_after_rotation=len(old_on_a_after),
            new_token_exchanges_while_paused=fault_idm.exchanges_for(
                new_token, since=paused_at, until=resumed_at
            ),
            new_jwts_served_while_paused_by_a=new_jwts(paused_a),
            new_jwts_served_while_paused_by_b=new_jwts(paused_b),
        )

        assert statuses(samples_b) == {200: len(samples_b)}
        assert statuses(samples_a) == {200: len(samples_a)}
        assert old_on_a_after == [], "the replica that rotated serves the new token at once"
        # Within the trust bound of the rotation, one exchange of slack.
        assert delay <= TRUST_SECONDS + 0.5, f"B served the old token {delay:.2f} s on"
        assert max(old_b) < first_new_b, "once B serves the new token it never goes back"
        assert [s for s in samples_b if s.started >= resumed_at + 0.5], "load ran after resume"
        # Cut off, B exchanged the new token once (its in-process single flight).
        assert new_jwts(paused_b) == 1


class TestAdminChangeWhileRedisDown:
    async def test_the_replica_that_made_a_change_exchanges_at_most_once_per_credential(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        server, _ = replicas
        admin = Admin(server.url, server_secrets.admin_key)
        hot, other = slug("hot"), slug("other")
        hot_token = new_api_token()
        await admin.team(hot)
        await admin.credential(hot, hot_token)
        await admin.team(other)
        await admin.credential(other, new_api_token())
        headers = await admin.client([hot])
        target = Target("hot", token_path(hot))

        async with LoadClient(server.url, 4) as load:
            assert (await request_once(load[0], target, headers)).status == 200
            stop = asyncio.Event()
            running = asyncio.create_task(
                steady_load(load, lambda: [target], headers, clients=4, stop=stop, pause=0.01)
            )
            await asyncio.sleep(0.3)
            redis_server.pause()
            paused_at = time.monotonic()
            await admin.rotate(other, new_api_token())  # a change to another team
            await asyncio.sleep(2.0)
            resumed_at = time.monotonic()
            redis_server.resume()
            stop.set()
            samples = await running

        exchanges = fault_idm.exchanges_for(hot_token, since=paused_at, until=resumed_at)
        figures(
            "admin_change_while_redis_down",
            statuses=statuses(samples),
            hot_credential_exchanges_while_paused=exchanges,
            outage_s=resumed_at - paused_at,
        )
        assert statuses(samples) == {200: len(samples)}
        assert exchanges <= 1, f"{exchanges} exchanges of one credential in one process"


class TestRotationAcrossRedisRestart:
    """An emptied Redis reads like one where nothing ever changed (no generation at all); before
    the fix, a replica that had distrusted its memory during the outage trusted its pre-outage
    credential snapshot again and served the rotated token's JWT (for up to the cache's max
    age), when the replica that rotated could not bump the generation afterwards."""

    async def test_a_replica_serves_the_new_token_once_an_emptied_redis_is_back(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        a, b = replicas
        admin = Admin(a.url, server_secrets.admin_key)
        team = slug("restart")
        old_token, new_token = new_api_token(), new_api_token()
        await admin.team(team)
        await admin.credential(team, old_token)
        headers = await admin.client([team])
        target = Target("restart", token_path(team))

        async with LoadClient(b.url, 1) as on_b:
            for _ in range(2):  # B holds the credential and its JWT in memory
                assert sub(await request_once(on_b[0], target, headers)) == subject_of(old_token)
            redis_server.kill()
            # B serves on while Redis is gone (it cannot check the generation, so it reads the
            # credential from the database: still the old token), then the rotation lands.
            assert sub(await request_once(on_b[0], target, headers)) == subject_of(old_token)
            await admin.rotate(team, new_token)  # committed; the generation bump fails
            # The replica that rotated hangs (SIGSTOP) before Redis is back, so its retried
            # generation bump cannot tell B: only the rotation in the database can.
            a.pause()
            await asyncio.to_thread(redis_server.start)  # the same port, empty
            # B's next request for this credential comes once B uses Redis again; asked while
            # it still skips Redis, B would read the credential from the database.
            await until_ready(b.url)
            samples = []
            asked_at = time.monotonic()
            while time.monotonic() < asked_at + 1.0:
                samples.append(await request_once(on_b[0], target, headers))
                await asyncio.sleep(0.05)

        old = [s for s in samples if s.token and sub(s) == subject_of(old_token)]
        figures(
            "rotation_across_redis_restart",
            statuses=statuses(samples),
            old_jwts_served_after_restart=len(old),
            requests_after_restart=len(samples),
            sequence="".join(
                "?" if not s.token else "N" if sub(s) == subject_of(new_token) else "O"
                for s in samples
            ),
        )
        assert statuses(samples) == {200: len(samples)}
        assert old == [], "B served a JWT of the rotated API token after Redis came back"


class TestRedisBlipDuringAnExchange:
    async def test_another_replica_is_served_after_a_blip_during_an_exchange(
        self,
        replicas: tuple[TokenvendServer, TokenvendServer],
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        a, b = replicas
        admin = Admin(a.url, server_secrets.admin_key)
        team = slug("blip")
        api_token = new_api_token()
        await admin.team(team)
        await admin.credential(team, api_token)
        headers = await admin.client([team])
        target = Target("blip", token_path(team))
        fault_idm.set_mode(DevIdmMode(delay_ms=1000))

        async with LoadClient(a.url, 1) as on_a, LoadClient(b.url, 1) as on_b:
            on_a_task = asyncio.create_task(request_once(on_a[0], target, headers))
            await until(lambda: fault_idm.exchanges_for(api_token) > 0)  # A holds the lock
            redis_server.pause()  # a blip: A's put and unlock land in it
            first = await on_a_task
            redis_server.resume()
            # B uses Redis again (its refresher may have met the blip too); asked while still
            # skipping Redis, B would exchange on its own and never meet the lock.
            await until_ready(b.url)
            with SyncRedis.from_url(redis_server.url) as r:
                left = [(k, r.pttl(k)) for k in r.scan_iter(match="*:lock", count=1000)]
            on_b_sample = await request_once(on_b[0], target, headers)

        figures(
            "redis_blip_during_exchange",
            a_status=first.status,
            b_status=on_b_sample.status if on_b_sample.code is None else on_b_sample.code,
            b_latency_s=on_b_sample.latency,
            locks_left_ms=[ttl for _, ttl in left],
            exchanges=fault_idm.exchanges_for(api_token),
        )
        assert first.status == 200
        assert on_b_sample.status == 200, "B waited for a lock nobody will release"
        assert on_b_sample.latency < REQUEST_DEADLINE
