"""`python -m bench`: set up on loopback, measure, print the comparison, write the raw numbers."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import pyload, report, scenarios
from bench.load import loadgen_name
from bench.stack import PG_ADMIN_URL, REDIS_URL, Stack

PARTS = ("cached", "workers", "cold", "scale")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark tokenvend against a bare FastAPI reference (see bench/README.md).",
    )
    parser.add_argument("--quick", action="store_true", help="short rounds (about a minute)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per target (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per round (10; quick 3)")
    parser.add_argument("--warmup", type=float, help="unrecorded seconds per target (2; quick 0.5)")
    parser.add_argument("--connections", type=int, default=32, help="concurrency (default 32)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--scale-teams", type=int, help="teams for the scale part (10,000; quick 1,000)"
    )
    parser.add_argument(
        "--scale-warm",
        choices=["cache", "exchange"],
        default="cache",
        help="how the scale teams get their JWTs: stored through RedisCache (fast, default) or "
        "exchanged at the dev IdM (the miss path, minutes for 10,000)",
    )
    parser.add_argument("--cold-credentials", type=int, default=100)
    parser.add_argument("--cold-per-credential", type=int, default=10)
    parser.add_argument("--idm-delay-ms", type=int, default=50)
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument(
        "--output", type=Path, default=report.RESULTS / "latest.json", help="raw numbers (JSON)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 3 when a target is missed"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile a cached-vend load instead (py-spy)"
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (the GC, uvloop, hiredis)",
    )
    parser.add_argument("--profiler", choices=["auto", "py-spy", "pyinstrument"], default="auto")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}")
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 2.0
    if args.scale_teams is None:
        args.scale_teams = 1_000 if args.quick else 10_000
    return args


def log(line: str) -> None:
    print(line, flush=True)


def _raise_file_limit() -> None:
    """A thousand concurrent connections need more descriptors than a default soft limit of 1024
    (the servers inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16_384 if hard == resource.RLIM_INFINITY else min(hard, 16_384)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    want = set(args.only)
    options = scenarios.Options(
        quick=args.quick,
        rounds=args.rounds,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        loadgen=loadgen_name(args.loadgen),
        scale_teams=args.scale_teams,
        cold_credentials=args.cold_credentials,
        cold_per_credential=args.cold_per_credential,
        idm_delay_ms=args.idm_delay_ms,
        scale_warm=args.scale_warm,
    )
    results: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "parts": sorted(want),
            "loadgen": options.loadgen,
            "connections": options.connections,
            "rounds": options.rounds,
            "duration_s": options.duration,
            "warmup_s": options.warmup,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "wrk": shutil.which("wrk"),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    }
    started = time.perf_counter()
    stack = Stack(
        pg_admin_url=args.pg_admin_url,
        redis_url=args.redis_url,
        want_workers=(1, 2) if "workers" in want else (1,),
        want_reference="cached" in want,
    )
    log(f"bench: setting up in {stack.workdir} (loadgen {options.loadgen})")
    ctx: scenarios.Context | None = None
    try:
        async with stack:
            ctx = scenarios.Context(stack, options, log)
            await scenarios.prepare(ctx, cold="cold" in want, scale="scale" in want)
            log(f"bench: ready after {time.perf_counter() - started:.1f} s")
            ctx.checkpoint("after setup")
            if want & {"cached", "workers"}:
                log("bench: cached vend")
                results["cached"] = await scenarios.cached(
                    ctx, with_reference="cached" in want, with_workers="workers" in want
                )
                ctx.checkpoint("after cached vend")
            # Scale before the cold burst: a thousand connections at once leave the worker's
            # heap grown, which would blur the memory cost of 10,000 cached credentials.
            if "scale" in want:
                log(f"bench: scale ({options.scale_teams:,} teams)")
                results["scale"] = await scenarios.scale(ctx)
                log("bench: refresher")
                results["refresher"] = await scenarios.refresher(ctx)
            if "cold" in want:
                log("bench: cold path")
                results["cold"] = await scenarios.cold(ctx)
                ctx.checkpoint("after cold path")
    except BaseException:
        results["error"] = traceback.format_exc()
        raise
    finally:
        if ctx is not None:
            results["memory"] = ctx.memory
        results["meta"]["elapsed_s"] = time.perf_counter() - started
        report.write(results, args.output)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _raise_file_limit()
    if args.profile:
        from bench import profile

        return profile.main(args)
    try:
        results = pyload.run(run(args))
    except Exception as exc:
        print(f"bench: failed: {exc!r} (partial numbers in {args.output})", file=sys.stderr)
        raise
    print()
    print(report.render(results))
    print(f"\nraw numbers: {args.output}   elapsed: {results['meta']['elapsed_s']:.0f} s")
    if args.strict and any(v.ok is False for v in report.verdicts(results)):
        return 3
    return 0
