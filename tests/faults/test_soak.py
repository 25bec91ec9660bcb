"""Soak: constant load on short-lived JWTs, so that the proactive refresher works all the time.

JWTs live EXPIRES_IN seconds; the refresher exchanges anew after `refresh_fraction` of that (0.5,
jittered by +-10 %), the cache drops a JWT `expiry_margin` before it expires, and callers ask with
`min_ttl=0`. Over the soak, every request must be answered 200 with an unexpired JWT, and the
exchanges must be the first one plus about one per refresh period: no more (nothing exchanges on
the hot path) and no fewer (no JWT outlives its refresh).

The soak lasts TOKENVEND_SOAK_SECONDS (default 20); the slow form lasts 120 s.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import pytest

from app.integrations.phrase.dev_idm import DevIdmMode
from tests.faults.conftest import (
    Admin,
    CountingDevIdm,
    LoadClient,
    Secrets,
    ServerFactory,
    Target,
    figures,
    new_api_token,
    request_once,
    statuses,
    steady_load,
    token_path,
    worst_latency,
)
from tests.support.processes import RedisServer

EXPIRES_IN = 20
EXPIRY_MARGIN = 2
REFRESH_INTERVAL = 0.5
REFRESH_FRACTION = 0.5  # the default
REFRESH_JITTER = 0.1  # the default
CLIENTS = 8
SOAK_SECONDS = float(os.environ.get("TOKENVEND_SOAK_SECONDS", "20"))
LONG_SOAK_SECONDS = 120.0


def exchange_bounds(duration: float) -> tuple[int, float, int]:
    """(fewest, predicted, most) exchanges over `duration`, the first one included.

    A refresh falls due `fraction * (1 +- jitter)` of the remaining life after an exchange and runs
    at the refresher's next tick. The remaining life is `expires_in` less up to a second, because
    the IdM's `exp` is whole seconds and the broker takes `min(expires_in, exp)`.
    """
    shortest = (EXPIRES_IN - 1) * REFRESH_FRACTION * (1 - REFRESH_JITTER)
    longest = EXPIRES_IN * REFRESH_FRACTION * (1 + REFRESH_JITTER) + REFRESH_INTERVAL
    predicted = 1 + duration / (EXPIRES_IN * REFRESH_FRACTION)
    return 1 + math.floor(duration / longest), predicted, 1 + math.ceil(duration / shortest)


async def soak(
    start_server: ServerFactory, idm: CountingDevIdm, admin_key: str, duration: float
) -> None:
    idm.set_mode(DevIdmMode(expires_in=EXPIRES_IN))
    server = start_server(
        TOKENVEND_EXPIRY_MARGIN_SECONDS=str(EXPIRY_MARGIN),
        TOKENVEND_REFRESH_INTERVAL_SECONDS=str(REFRESH_INTERVAL),
    )
    admin = Admin(server.url, admin_key)
    api_token = new_api_token()
    team = f"soak-{int(duration)}"  # the short and the long soak share the module's database
    await admin.team(team)
    await admin.credential(team, api_token)
    headers = await admin.client([team])
    target = Target(team, token_path(team), {"min_ttl": 0})

    async with LoadClient(server.url, CLIENTS) as load:
        first = await request_once(load[0], target, headers)
        assert first.status == 200, "the first exchange"
        started = time.monotonic()
        stop = asyncio.Event()
        load = asyncio.create_task(
            steady_load(load, lambda: [target], headers, clients=CLIENTS, stop=stop, pause=0.005)
        )
        await asyncio.sleep(duration)
        stop.set()
        samples = [first, *await load]
    elapsed = time.monotonic() - started

    exchanges = idm.exchanges_for(api_token)
    fewest, predicted, most = exchange_bounds(elapsed)
    served = [s for s in samples if s.status == 200]
    expired = [s for s in served if s.claims()["exp"] <= s.wall]
    least_left = min(s.claims()["exp"] - s.wall for s in served)
    distinct = len({s.claims()["jti"] for s in served})
    figures(
        f"soak_{duration:.0f}s",
        requests=len(samples),
        statuses=statuses(samples),
        errors=len(samples) - len(served),
        expired_served=len(expired),
        least_remaining_s=least_left,
        worst_latency_s=worst_latency(samples),
        exchanges=exchanges,
        predicted=round(predicted, 1),
        allowed=f"{fewest}..{most}",
        distinct_jwts_served=distinct,
    )

    assert statuses(samples) == {200: len(samples)}
    assert expired == [], "no JWT served at or past its exp"
    assert least_left > 0
    assert fewest <= exchanges <= most, (exchanges, predicted)
    # Every exchanged JWT was served (the last one may land as the load stops): the refresher
    # replaced each before its end, and nothing exchanged without need.
    assert exchanges - 1 <= distinct <= exchanges


class TestSoak:
    async def test_constant_load_on_short_lived_jwts(
        self,
        start_server: ServerFactory,
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        await soak(start_server, fault_idm, server_secrets.admin_key, SOAK_SECONDS)

    @pytest.mark.slow
    @pytest.mark.timeout(LONG_SOAK_SECONDS + 120)
    async def test_long_soak(
        self,
        start_server: ServerFactory,
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
    ) -> None:
        await soak(start_server, fault_idm, server_secrets.admin_key, LONG_SOAK_SECONDS)
