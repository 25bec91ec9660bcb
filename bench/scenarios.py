"""The measurements. Each returns a plain dict of raw figures for `bench/results/latest.json`;
`bench.report` turns them into the printed tables and the PASS/FAIL verdicts.

Shared-machine rule: no figure is read alone. Targets are driven alternately (A B C A B C ...)
with the same load generator, concurrency and duration, and each ratio is taken within a round,
then the median over rounds is reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from redis.asyncio import Redis

from app.core.config import Settings
from app.main import create_app
from bench import pyload
from bench.load import Figures, Target, drive
from bench.seed import AdminApi, SeededClient, cache_jwts, insert_teams
from bench.stack import HttpServer, Stack, cpu_seconds, machine_ticks, rss_mb

TOKEN_PATH = "/v1/teams/{team}/token"
BENCH_TEAM = "bench"

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool
    rounds: int
    duration: float
    warmup: float
    connections: int
    loadgen: str
    scale_teams: int
    cold_credentials: int
    cold_per_credential: int
    idm_delay_ms: int
    scale_warm: str = "cache"  # "cache": JWTs stored through RedisCache; "exchange": at the IdM
    sweep_connections: int = 64


@dataclass
class Context:
    stack: Stack
    options: Options
    log: Log
    service: SeededClient | None = None  # granted the bench team only
    scale: SeededClient | None = None  # granted every team ("*")
    scale_ids: dict[str, uuid.UUID] = field(default_factory=dict)
    cold_slugs: list[str] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)

    @property
    def w1(self) -> HttpServer:
        return self.stack.servers[1]

    def http(self, server: HttpServer) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.url, timeout=30.0, trust_env=False)

    def checkpoint(self, label: str) -> dict[str, dict[str, float]]:
        """Resident memory (MB) of every tokenvend worker now, kept under `label`."""
        rss = {f"tokenvend-w{w}": worker_memory(server) for w, server in self.stack.servers.items()}
        self.memory.append({"when": label, "rss_mb": rss})
        return rss


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def prepare(ctx: Context, *, cold: bool, scale: bool) -> None:
    """Seed through the admin API and the database, then vend the bench team once everywhere so
    the measured rounds start warm (key cache, credential directory, L1)."""
    stack = ctx.stack
    async with ctx.http(ctx.w1) as http:
        admin = AdminApi(http, stack.admin_key)
        await admin.team_with_credential(BENCH_TEAM)
        ctx.service = await admin.client("bench-service", [BENCH_TEAM])
        ctx.scale = await admin.client("bench-scale", ["*"])
    if cold:
        ctx.cold_slugs = [f"cold-{i}" for i in range(ctx.options.cold_credentials)]
        await insert_teams(stack.database_url, stack.keyring, ctx.cold_slugs)
    if scale:
        slugs = [f"scale-{i}" for i in range(ctx.options.scale_teams)]
        started = time.perf_counter()
        ctx.scale_ids = await insert_teams(stack.database_url, stack.keyring, slugs)
        ctx.log(
            f"  seeded {len(slugs)} teams in the database in {time.perf_counter() - started:.1f} s"
        )
    # The admin calls above flushed every replica's in-process caches; now warm them.
    jwt = ""
    for server in stack.servers.values():
        async with ctx.http(server) as http:
            for client in (ctx.service, ctx.scale):
                for _ in range(4):  # with several workers, more than one of them
                    r = await http.get(TOKEN_PATH.format(team=BENCH_TEAM), headers=client.headers)
                    r.raise_for_status()
                    jwt = r.json()["access_token"]
    if stack.reference is not None:
        # The reference returns a value of the same size as the JWT tokenvend vends.
        redis = Redis.from_url(stack.redis_url)
        try:
            await redis.set(stack.reference_key, jwt)
        finally:
            await redis.aclose()


def _token_target(name: str, server: HttpServer, client: SeededClient, team: str) -> Target:
    return Target(
        name,
        server.port,
        client.headers,
        TOKEN_PATH.format(team=team),
        pids=tuple(server.worker_pids()),
    )


async def rotation(
    ctx: Context, targets: list[Target], *, label: str
) -> dict[str, list[dict[str, Any]]]:
    """Warm each target once (not recorded), then `rounds` rounds of A B C ...

    Each round also notes the transactions PostgreSQL committed in the benchmark's database
    meanwhile (`pg_stat_database`, flushed by the backends about once a second, so approximate):
    the audit writer's batches are expected, per-request lookups are not."""
    opts = ctx.options
    for target in targets:
        await drive(
            target, connections=opts.connections, duration=opts.warmup, loadgen=opts.loadgen
        )
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for n in range(opts.rounds):
        cells = []
        for target in targets:
            before = await ctx.stack.database_transactions()
            metrics_before = await target_counters(target)
            cpu_before = sum(cpu_seconds(pid) for pid in target.pids)
            busy_before, total_before = machine_ticks()
            figures = await drive(
                target, connections=opts.connections, duration=opts.duration, loadgen=opts.loadgen
            )
            cpu = sum(cpu_seconds(pid) for pid in target.pids) - cpu_before
            busy, total = machine_ticks()
            if not opts.quick:
                await asyncio.sleep(1.1)  # backends report their counts after a second idle
            transactions = await ctx.stack.database_transactions() - before
            row = figures.as_dict()
            row["db_transactions"] = transactions
            # The server's CPU per request: what throughput means on a busy two-core machine,
            # without the noise of how much CPU the load generator and Redis left over.
            row["cpu_us_per_request"] = cpu / max(figures.requests, 1) * 1e6
            # All cores, all processes (load generator, Redis, PostgreSQL included): near 100 %
            # the throughput is bounded by the machine, not by the server.
            row["machine_busy_pct"] = (busy - busy_before) / max(total - total_before, 1) * 100
            row["db_transactions_per_1k_requests"] = transactions / max(figures.requests, 1) * 1000
            row["metrics"] = counter_deltas(metrics_before, await target_counters(target))
            fallbacks = sum(
                v for k, v in row["metrics"].items() if k.startswith("tokenvend_cache_fallbacks")
            )
            rounds[target.name].append(row)
            cells.append(
                _cell(figures)
                + f" cpu {row['cpu_us_per_request']:.0f} us/req"
                + f" machine busy {row['machine_busy_pct']:.0f} %"
                + f" db tx/1k req {row['db_transactions_per_1k_requests']:.1f}"
                + (f" redis fallbacks {fallbacks:g}" if fallbacks else "")
            )
        ctx.log(f"  {label} round {n + 1}/{opts.rounds}: " + " | ".join(cells))
    return rounds


def _cell(f: Figures) -> str:
    flag = "" if f.valid else f" INVALID(non2xx={f.non2xx}, errors={f.errors})"
    return f"{f.target} {f.rps:,.0f} req/s p50 {f.p50_ms:.2f} ms p99 {f.p99_ms:.2f} ms{flag}"


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "rps": median([r["rps"] for r in rows]),
            "p50_ms": median([r["p50_ms"] for r in rows]),
            "p99_ms": median([r["p99_ms"] for r in rows]),
            "db_tx_per_1k": median([r["db_transactions_per_1k_requests"] for r in rows]),
            "cpu_us_per_request": median([r["cpu_us_per_request"] for r in rows]),
            "machine_busy_pct": median([r.get("machine_busy_pct", float("nan")) for r in rows]),
            "valid": all(r["non2xx"] == 0 and r["errors"] == 0 for r in rows),
        }
        for name, rows in rounds.items()
    }


def round_ratios(
    rounds: dict[str, list[dict[str, Any]]], num: str, den: str, field_name: str
) -> list[float]:
    return [a[field_name] / b[field_name] for a, b in zip(rounds[num], rounds[den], strict=True)]


async def cached(ctx: Context, *, with_reference: bool, with_workers: bool) -> dict[str, Any]:
    """The cached vend: tokenvend (1 worker) against the reference, and 1 against 2 workers."""
    assert ctx.service is not None
    stack = ctx.stack
    targets = []
    if with_reference:
        assert stack.reference is not None
        targets.append(_reference_target("reference", stack.reference, stack))
    targets.append(_token_target("tokenvend-w1", ctx.w1, ctx.service, BENCH_TEAM))
    if with_workers:
        targets.append(_token_target("tokenvend-w2", stack.servers[2], ctx.service, BENCH_TEAM))
        if with_reference:
            targets.append(_reference_target("reference-w2", stack.references[2], stack))
    rounds = await rotation(ctx, targets, label="cached")
    result: dict[str, Any] = {"rounds": rounds, "median": summarize(rounds)}
    if with_reference:
        rps = round_ratios(rounds, "tokenvend-w1", "reference", "rps")
        p99 = round_ratios(rounds, "tokenvend-w1", "reference", "p99_ms")
        p50 = round_ratios(rounds, "tokenvend-w1", "reference", "p50_ms")
        result["ratio_rps"] = {"rounds": rps, "median": median(rps)}
        result["ratio_p99"] = {"rounds": p99, "median": median(p99)}
        result["ratio_p50"] = {"rounds": p50, "median": median(p50)}
        cpu = round_ratios(rounds, "tokenvend-w1", "reference", "cpu_us_per_request")
        result["ratio_cpu"] = {"rounds": cpu, "median": median(cpu)}
    if with_workers:
        scaling = round_ratios(rounds, "tokenvend-w2", "tokenvend-w1", "rps")
        result["workers_ratio_rps"] = {"rounds": scaling, "median": median(scaling)}
        if with_reference:
            scaling = round_ratios(rounds, "reference-w2", "reference", "rps")
            result["reference_workers_ratio_rps"] = {"rounds": scaling, "median": median(scaling)}
            versus = round_ratios(rounds, "tokenvend-w2", "reference-w2", "rps")
            result["ratio_rps_w2"] = {"rounds": versus, "median": median(versus)}
    return result


def _reference_target(name: str, server: HttpServer, stack: Stack) -> Target:
    return Target(
        name,
        server.port,
        {"Authorization": f"Bearer {stack.reference_token}"},
        TOKEN_PATH.format(team=BENCH_TEAM),
        has_metrics=False,
        pids=tuple(server.worker_pids()),
    )


async def _idm_state(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/_dev/state")
    r.raise_for_status()
    state: dict[str, Any] = r.json()
    return state


async def cold(ctx: Context) -> dict[str, Any]:
    """N cold credentials, `per` concurrent requests each, the IdM slowed down: how many exchanges
    and how long until the last answer."""
    assert ctx.scale is not None
    opts = ctx.options
    async with ctx.http(ctx.stack.idm) as idm, ctx.http(ctx.w1) as tv:
        (await idm.post("/_dev/reset")).raise_for_status()
        r = await idm.put("/_dev/mode", json={"delay_ms": opts.idm_delay_ms})
        r.raise_for_status()
        # The key cache is warm (a client's first request is not what this measures).
        r = await tv.get(TOKEN_PATH.format(team=BENCH_TEAM), headers=ctx.scale.headers)
        r.raise_for_status()
        warm_cache = r.json()["cache"]
        before = (await _idm_state(idm))["exchanges"]
        metrics_before = await counters(tv)
        requests = [
            pyload.request_bytes(TOKEN_PATH.format(team=slug), ctx.scale.headers)
            for _ in range(opts.cold_per_credential)
            for slug in ctx.cold_slugs
        ]
        try:
            responses, elapsed = await pyload.burst(ctx.w1.port, requests)
        finally:
            (await idm.put("/_dev/mode", json={"delay_ms": 0})).raise_for_status()
        exchanges = (await _idm_state(idm))["exchanges"] - before
        metrics = counter_deltas(metrics_before, await counters(tv))
    statuses = Counter(r.status for r in responses)
    caches = Counter(orjson.loads(r.body).get("cache") for r in responses if r.status == 200)
    problems = Counter(
        f"{r.status} {orjson.loads(r.body).get('code')}" for r in responses if r.status != 200
    )
    latencies = sorted(r.seconds for r in responses)
    return {
        "credentials": len(ctx.cold_slugs),
        "requests": len(requests),
        "idm_delay_ms": opts.idm_delay_ms,
        "exchanges": exchanges,
        "exchanges_before_burst": before,
        "warm_request_cache": warm_cache,
        "all_answered_s": elapsed,
        "bar_s": 2 * opts.idm_delay_ms / 1000 + 1,
        "statuses": {str(k): v for k, v in statuses.items()},
        "cache": {str(k): v for k, v in caches.items()},
        "problems": dict(problems),
        "metrics": metrics,
        "p50_ms": pyload.percentile(latencies, 50) * 1000,
        "p99_ms": pyload.percentile(latencies, 99) * 1000,
    }


async def counters(http: httpx.AsyncClient) -> dict[str, float]:
    """tokenvend's counters from /metrics (`tokenvend_*_total` samples, labels included)."""
    r = await http.get("/metrics")
    r.raise_for_status()
    found = {}
    for line in r.text.splitlines():
        if line.startswith("tokenvend_") and "_total" in line.split(" ", 1)[0]:
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def target_counters(target: Target) -> dict[str, float]:
    if not target.has_metrics:
        return {}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{target.port}", timeout=10.0, trust_env=False
    ) as http:
        return await counters(http)


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What moved, leaving out the HTTP request counters (the burst itself)."""
    return {
        name: value - before.get(name, 0.0)
        for name, value in sorted(after.items())
        if value != before.get(name, 0.0) and not name.startswith("tokenvend_http_")
    }


def worker_memory(server: HttpServer) -> dict[str, float]:
    return {str(pid): round(rss_mb(pid), 1) for pid in server.worker_pids()}


async def scale(ctx: Context) -> dict[str, Any]:
    """Many cached credentials: give each a cached JWT and vend each once (so every layer holds
    it: Redis, the worker's L1, its credential directory), then random teams against one team."""
    assert ctx.scale is not None
    opts = ctx.options
    n = len(ctx.scale_ids)
    if opts.scale_warm == "cache":
        started = time.perf_counter()
        await cache_jwts(
            ctx.stack.redis_url, ctx.stack.prefix, ctx.stack.keyring, list(ctx.scale_ids.values())
        )
        ctx.log(f"  stored {n} JWTs through RedisCache in {time.perf_counter() - started:.1f} s")
    async with ctx.http(ctx.stack.idm) as idm:
        before = (await _idm_state(idm))["exchanges"]
        requests = [
            pyload.request_bytes(TOKEN_PATH.format(team=f"scale-{i}"), ctx.scale.headers)
            for i in range(n)
        ]
        responses, warm_s = await pyload.sweep(
            ctx.w1.port, requests, connections=opts.sweep_connections
        )
        warm_exchanges = (await _idm_state(idm))["exchanges"] - before
    statuses = Counter(r.status for r in responses)
    caches = Counter(orjson.loads(r.body).get("cache") for r in responses if r.status == 200)
    ctx.log(
        f"  vended each of {n} once in {warm_s:.1f} s ({n / warm_s:,.0f} vends/s, "
        f"cache {dict(caches)}, {warm_exchanges} exchanges, statuses {dict(statuses)})"
    )
    if statuses.get(200, 0) != n:
        raise RuntimeError(f"warming the scale teams failed: {dict(statuses)}")
    ctx.checkpoint("after scale warm-up")
    targets = [
        _token_target("one-credential", ctx.w1, ctx.scale, BENCH_TEAM),
        Target(
            f"{n}-credentials",
            ctx.w1.port,
            ctx.scale.headers,
            "/v1/teams/scale-",
            "/token",
            count=n,
            pids=tuple(ctx.w1.worker_pids()),
        ),
    ]
    rounds = await rotation(ctx, targets, label="scale")
    rps = round_ratios(rounds, targets[1].name, targets[0].name, "rps")
    p99 = round_ratios(rounds, targets[1].name, targets[0].name, "p99_ms")
    memory = ctx.checkpoint("after scale rounds")
    idle = await idle_cpu(ctx.w1, seconds=2.0 if opts.quick else 5.0)
    return {
        "credentials": n,
        "warm": {
            "method": opts.scale_warm,
            "seconds": warm_s,
            "vends_per_s": n / warm_s,
            "exchanges": warm_exchanges,
            "cache": {str(k): v for k, v in caches.items()},
            "statuses": {str(k): v for k, v in statuses.items()},
        },
        "rounds": rounds,
        "median": summarize(rounds),
        "ratio_rps": {"rounds": rps, "median": median(rps)},
        "ratio_p99": {"rounds": p99, "median": median(p99)},
        "rss_mb": memory,
        "idle_worker_cpu_percent": idle,
    }


async def idle_cpu(server: HttpServer, *, seconds: float) -> float:
    """CPU the worker spends with no requests: the refresher's tick, the invalidation pings, the
    audit writer; in percent of one core."""
    pid = server.worker_pids()[0]
    await asyncio.sleep(1.0)  # let the audit writer drain what the last round left
    start = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - start) / seconds * 100


def _in_process_settings(stack: Stack, prefix: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=stack.database_url,
        redis_url=stack.redis_url,
        redis_prefix=prefix,
        encryption_keys=stack.encryption_keys,
        phrase_eu_url=stack.idm.url,
        phrase_us_url=stack.idm.url,
        log_level="WARNING",
    )


async def refresher(ctx: Context) -> dict[str, Any]:
    """Time `Refresher.tick()` of a tokenvend built in this process (its own background loop
    stopped, so only these explicit ticks run).

    - With nothing due, as at almost every tick, on the benchmark's prefix: the 10,000 cached
      credentials' refresh schedule (a tick with nothing due only reads).
    - With a full batch (100) due, on a prefix of its own, so that the servers' refresher (the
      leader on the shared prefix) cannot race it and exchange the same credentials again.
    """
    stack = ctx.stack
    idle = []
    app = create_app(_in_process_settings(stack, stack.prefix))
    async with app.router.lifespan_context(app):
        infra = app.state.infra
        await infra.refresher.stop()
        for _ in range(10 if ctx.options.quick else 30):
            started = time.perf_counter()
            await infra.refresher.tick()
            idle.append((time.perf_counter() - started) * 1000)
    due_ids = list(ctx.scale_ids.values())[:100]
    app = create_app(_in_process_settings(stack, f"{stack.prefix}refresher:"))
    async with app.router.lifespan_context(app), ctx.http(stack.idm) as idm:
        infra = app.state.infra
        await infra.refresher.stop()
        now = time.time()
        for cred_id in due_ids:
            await infra.cache.schedule_refresh(cred_id, 1, now - 1)
            infra.cache.note_vended(cred_id)
        await infra.cache.flush_vended()
        before = (await _idm_state(idm))["exchanges"]
        started = time.perf_counter()
        refreshed = await infra.refresher.tick()
        full_ms = (time.perf_counter() - started) * 1000
        exchanges = (await _idm_state(idm))["exchanges"] - before
    return {
        "idle_tick_ms": {"median": median(idle), "max": max(idle), "samples": len(idle)},
        "due_tick": {
            "due": len(due_ids),
            "refreshed": refreshed,
            "ms": full_ms,
            "ms_per_refresh": full_ms / refreshed if refreshed else None,
            "idm_exchanges": exchanges,
        },
    }
