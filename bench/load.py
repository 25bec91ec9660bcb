"""Driving a target with load: wrk when it is installed, else `bench.pyload` in its own process.

Both print one `BENCH_JSON {...}` line, parsed into `Figures`: requests per second, latency
percentiles in milliseconds, and the count of non-2xx answers and socket errors (a run with any of
those is reported as invalid: a fast 429 or 500 is no achievement).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

LOOPBACK = "127.0.0.1"
WRK_THREADS = 1  # two cores: leave as much of them as possible to the server under test

_WRK_SCRIPT = """
local count = {count}
local prefix, suffix = "{prefix}", "{suffix}"
init = function(args)
  math.randomseed(os.time())
end
{request}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {{"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"non2xx":%d,"errors":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""
_WRK_RANDOM_REQUEST = """
request = function()
  return wrk.format(nil, prefix .. math.random(0, count - 1) .. suffix)
end
"""


@dataclass(frozen=True, slots=True)
class Target:
    """What to load: a fixed path, or `prefix + i + suffix` for a random i below `count`."""

    name: str
    port: int
    headers: Mapping[str, str]
    prefix: str
    suffix: str = ""
    count: int = 0
    has_metrics: bool = True  # serves tokenvend's /metrics (the reference does not)
    pids: tuple[int, ...] = ()  # the server's workers, whose CPU time is charged to the target

    @property
    def fixed_path(self) -> str:
        return self.prefix + self.suffix

    def paths(self) -> list[str]:
        if not self.count:
            return [self.fixed_path]
        return [f"{self.prefix}{i}{self.suffix}" for i in range(self.count)]


@dataclass(frozen=True, slots=True)
class Figures:
    target: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    duration_s: float
    non2xx: int
    errors: int

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.non2xx == 0 and self.errors == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def loadgen_name(preference: str) -> str:
    if preference == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if preference == "wrk" and not shutil.which("wrk"):
        raise SystemExit("bench: --loadgen wrk, but wrk is not on PATH (apt-get install wrk)")
    return preference


async def drive(target: Target, *, connections: int, duration: float, loadgen: str) -> Figures:
    if loadgen == "wrk":
        raw = await _wrk(target, connections, duration)
        return Figures(
            target=target.name,
            rps=raw["requests"] / (raw["duration_us"] / 1e6),
            p50_ms=raw["p50_us"] / 1000,
            p90_ms=raw["p90_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            max_ms=raw["max_us"] / 1000,
            requests=raw["requests"],
            duration_s=raw["duration_us"] / 1e6,
            non2xx=raw["non2xx"],
            errors=raw["errors"],
        )
    raw = await _pyload(target, connections, duration)
    return Figures(
        target=target.name,
        rps=raw["rps"],
        p50_ms=raw["p50_ms"],
        p90_ms=raw["p90_ms"],
        p99_ms=raw["p99_ms"],
        max_ms=raw["max_ms"],
        requests=raw["requests"],
        duration_s=raw["duration_s"],
        non2xx=raw["non2xx"],
        errors=raw["errors"],
    )


async def _wrk(target: Target, connections: int, duration: float) -> dict[str, Any]:
    script = _WRK_SCRIPT.format(
        count=max(target.count, 1),
        prefix=target.prefix,
        suffix=target.suffix,
        request=_WRK_RANDOM_REQUEST if target.count else "",
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(script)
    try:
        argv = [
            "wrk",
            f"-t{min(WRK_THREADS, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "5s",
            "-s",
            handle.name,
        ]
        for name, value in target.headers.items():
            argv += ["-H", f"{name}: {value}"]
        argv.append(f"http://{LOOPBACK}:{target.port}{target.fixed_path}")
        return await _run_for_json(argv)
    finally:
        os.unlink(handle.name)


async def _pyload(target: Target, connections: int, duration: float) -> dict[str, Any]:
    config = {
        "port": target.port,
        "paths": target.paths(),
        "headers": dict(target.headers),
        "connections": connections,
        "duration": duration,
    }
    return await _run_for_json([sys.executable, "-m", "bench.pyload", json.dumps(config)])


async def _run_for_json(argv: list[str]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCH_JSON "):
            parsed: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return parsed
    raise RuntimeError(
        f"{argv[0]} printed no figures (exit {process.returncode}):\n"
        f"{out.decode(errors='replace')[-2000:]}\n{err.decode(errors='replace')[-2000:]}"
    )
