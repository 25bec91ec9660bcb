"""Stampedes across worker processes: `tokenvend serve --workers 3` with a slow development IdM.

Redis up: however many callers, however many processes, one exchange per cold credential (the
Redis lock; waiters read the winner's JWT). Redis hung (SIGSTOP): at most one exchange per process
(the in-process single flight), every caller still answered. `/metrics` sums the workers.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from app.integrations.phrase.dev_idm import DevIdmMode
from tests.faults.conftest import (
    Admin,
    CountingDevIdm,
    LoadClient,
    Sample,
    Secrets,
    ServerFactory,
    Target,
    burst,
    figures,
    new_api_token,
    request_once,
    statuses,
    subject_of,
    token_path,
    worst_latency,
)
from tests.support.processes import RedisServer

WORKERS = 3
CALLERS = 300
IDM_DELAY_MS = 300


def vends_total(metrics_text: str) -> float:
    """The sum of `tokenvend_vends_total` over its outcomes."""
    pattern = re.compile(r"^tokenvend_vends_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)
    return sum(float(v) for v in pattern.findall(metrics_text))


async def warm_every_worker(
    load: LoadClient, target: Target, headers: dict[str, str], concurrency: int = 30
) -> list[Sample]:
    """One request on each of the CALLERS connections, `concurrency` at a time: every worker
    holds some connection, so every worker has the client key in memory afterwards."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Sample:
        async with gate:
            return await request_once(load[i], target, headers)

    return list(await asyncio.gather(*(one(i) for i in range(CALLERS))))


class TestStampedeAcrossWorkers:
    async def test_one_exchange_with_redis_and_one_per_process_without(
        self,
        start_server: ServerFactory,
        redis_server: RedisServer,
        fault_idm: CountingDevIdm,
        server_secrets: Secrets,
        workdir: Path,
    ) -> None:
        metrics_dir = workdir / "metrics"
        metrics_dir.mkdir()
        server = start_server(
            workers=WORKERS,
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            # The default: 300 requests at once on two cores stall event loops for longer
            # than the 0.2 s the single-process tests use, which would count as Redis failing.
            TOKENVEND_REDIS_TIMEOUT_SECONDS="0.5",
        )
        admin = Admin(server.url, server_secrets.admin_key)
        tokens = {team: new_api_token() for team in ("warmup", "up", "down")}
        for team, token in tokens.items():
            await admin.team(team)
            await admin.credential(team, token)
        headers = await admin.client(list(tokens))

        async with LoadClient(server.url, CALLERS) as load:
            await load.connect(CALLERS)  # every worker accepts some of them
            warmup = await warm_every_worker(load, Target("warmup", token_path("warmup")), headers)
            fault_idm.set_mode(DevIdmMode(delay_ms=IDM_DELAY_MS))

            up = await burst(load, Target("up", token_path("up")), headers, CALLERS)
            up_exchanges = fault_idm.exchanges_for(tokens["up"])

            redis_server.pause()
            paused_at = time.monotonic()
            try:
                down = await burst(load, Target("down", token_path("down")), headers, CALLERS)
            finally:
                redis_server.resume()
            down_exchanges = fault_idm.exchanges_for(tokens["down"], since=paused_at)
            # Any worker answers the scrape; under multiprocess mode it sums them all.
            vends_scraped = vends_total((await load[0].get("/metrics")).text)

        # Requests that failed before the broker (authentication, the credential lookup) are
        # not vends.
        vends_made = sum(1 for s in [*warmup, *up, *down] if s.status == 200)
        pids = {p.stem.rsplit("_", 1)[-1] for p in metrics_dir.glob("counter_*.db")}
        figures(
            "stampede_3_workers",
            warmup_statuses=statuses(warmup),
            redis_up_statuses=statuses(up),
            redis_up_exchanges=up_exchanges,
            redis_up_worst_latency_s=worst_latency(up),
            redis_paused_statuses=statuses(down),
            redis_paused_exchanges=down_exchanges,
            redis_paused_worst_latency_s=worst_latency(down),
            vends_total_scraped=vends_scraped,
            vends_made=vends_made,
            processes_with_metrics=len(pids),
        )

        assert statuses(up) == {200: CALLERS}
        assert {s.claims()["sub"] for s in up} == {subject_of(tokens["up"])}
        assert up_exchanges == 1, "one exchange across all workers while Redis is up"
        assert 1 <= down_exchanges <= WORKERS, "at most one exchange per process without Redis"
        assert {s.claims()["sub"] for s in down if s.token} == {subject_of(tokens["down"])}
        # Multiprocess mode: every worker's vends, whichever worker answered the scrape (the
        # supervisor writes files too, hence more processes than workers).
        assert vends_scraped == vends_made
        assert len(pids) > WORKERS
        # Without Redis every request reads its client and credential from PostgreSQL (it
        # cannot check the cache generation): one query per key and process, not per request,
        # or the burst drains the pool (10 + 10 connections, 1 s checkout) into 503s.
        assert statuses(down) == {200: CALLERS}
