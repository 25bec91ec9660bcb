"""A small HTTP/1.1 load generator on raw asyncio streams (uvloop when installed), keep-alive.

It is the fallback when wrk is not installed, and the client for the fixed-count work wrk does not
do: the cold-path burst (N concurrent requests, each on its own connection) and the warm-up sweep
(each path exactly once). As the fallback load generator it runs in a process of its own, so it
does not share the server's core:

    python -m bench.pyload '{"port": 8000, "paths": ["/x"], "connections": 32, "duration": 10}'

prints one line `BENCH_JSON {...}` in the same shape as the wrk script's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def request_bytes(path: str, headers: Mapping[str, str], host: str = LOOPBACK) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    seconds: float


class Connection:
    """One keep-alive connection; responses must carry Content-Length (uvicorn's do)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int, host: str = LOOPBACK) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, request: bytes) -> Response:
        started = time.perf_counter()
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError("response without Content-Length")
        end = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : end])
        body = await self._reader.readexactly(length) if length else b""
        return Response(status, body, time.perf_counter() - started)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()


@dataclass
class LoadResult:
    requests: int = 0
    non2xx: int = 0
    errors: int = 0
    duration_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "requests": self.requests,
            "duration_s": self.duration_s,
            "rps": self.requests / self.duration_s if self.duration_s else 0.0,
            "p50_ms": percentile(lat, 50) * 1000,
            "p90_ms": percentile(lat, 90) * 1000,
            "p99_ms": percentile(lat, 99) * 1000,
            "max_ms": (lat[-1] if lat else 0.0) * 1000,
            "non2xx": self.non2xx,
            "errors": self.errors,
        }


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def run_load(
    port: int,
    paths: Sequence[str],
    headers: Mapping[str, str],
    *,
    connections: int,
    duration: float,
) -> LoadResult:
    """`connections` closed loops for `duration` seconds, each request to a random path."""
    requests = [request_bytes(p, headers) for p in paths]
    pick: Callable[[], bytes] = (
        (lambda: requests[0]) if len(requests) == 1 else (lambda: random.choice(requests))
    )
    result = LoadResult()
    started = time.perf_counter()
    deadline = started + duration

    async def loop() -> None:
        conn = await Connection.open(port)
        try:
            while time.perf_counter() < deadline:
                try:
                    response = await conn.send(pick())
                except (OSError, asyncio.IncompleteReadError, RuntimeError):
                    result.errors += 1
                    await conn.close()
                    conn = await Connection.open(port)
                    continue
                result.requests += 1
                result.latencies.append(response.seconds)
                if not 200 <= response.status < 300:
                    result.non2xx += 1
        finally:
            await conn.close()

    await asyncio.gather(*(loop() for _ in range(connections)))
    result.duration_s = time.perf_counter() - started
    return result


async def burst(port: int, requests: Sequence[bytes]) -> tuple[list[Response], float]:
    """Every request at once, each on a connection of its own; (responses, seconds until the
    last answer, connecting included)."""
    gate = asyncio.Event()
    connected = asyncio.Event()
    pending = len(requests)

    async def one(request: bytes) -> Response:
        nonlocal pending
        conn = await Connection.open(port)
        try:
            pending -= 1
            if pending == 0:
                connected.set()
            await gate.wait()
            return await conn.send(request)
        finally:
            await conn.close()

    tasks = [asyncio.ensure_future(one(r)) for r in requests]
    await asyncio.wait(
        [asyncio.ensure_future(connected.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED
    )
    started = time.perf_counter()
    gate.set()
    responses = await asyncio.gather(*tasks)
    return list(responses), time.perf_counter() - started


async def sweep(
    port: int, requests: Sequence[bytes], *, connections: int
) -> tuple[list[Response], float]:
    """Each request exactly once, over `connections` keep-alive connections."""
    queue = iter(enumerate(requests))
    out: list[Response | None] = [None] * len(requests)
    started = time.perf_counter()

    async def loop() -> None:
        conn = await Connection.open(port)
        try:
            for index, request in queue:
                out[index] = await conn.send(request)
        finally:
            await conn.close()

    await asyncio.gather(*(loop() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return [r for r in out if r is not None], elapsed


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop when it is installed (it is, with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    result = run(
        run_load(
            config["port"],
            config["paths"],
            config.get("headers", {}),
            connections=config["connections"],
            duration=config["duration"],
        )
    )
    print("BENCH_JSON " + json.dumps(result.summary()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
