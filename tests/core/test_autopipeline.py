"""`ScriptPipeline` on a real Redis: concurrent calls share round trips, each keeps its own
result, its place in the order and its own error."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.core.autopipeline import ScriptPipeline

# Appends ARGV[1] to a list and answers the list's length and ARGV[1]; "boom" is an error reply.
SCRIPT = """
if ARGV[1] == 'boom' then return redis.error_reply('boom') end
return {redis.call('RPUSH', KEYS[1], ARGV[1]), ARGV[1]}
"""


async def test_concurrent_calls_share_round_trips_and_run_in_order(
    redis: Redis, prefix: str
) -> None:
    calls = ScriptPipeline(redis, SCRIPT)
    key = f"{prefix}order"

    results = await asyncio.gather(*(calls([key], [str(i)]) for i in range(200)))

    assert results == [[i + 1, str(i).encode()] for i in range(200)]
    assert await redis.lrange(key, 0, -1) == [str(i).encode() for i in range(200)]
    assert calls.round_trips <= 10  # the first alone, the rest in pipelines of up to 64


async def test_an_idle_call_goes_out_alone_and_at_once(redis: Redis, prefix: str) -> None:
    calls = ScriptPipeline(redis, SCRIPT)
    for i in range(3):
        assert await calls([f"{prefix}idle"], [str(i)]) == [i + 1, str(i).encode()]
    assert calls.round_trips == 3


async def test_an_error_reply_fails_only_its_own_call(redis: Redis, prefix: str) -> None:
    calls = ScriptPipeline(redis, SCRIPT)
    key = f"{prefix}errors"

    results = await asyncio.gather(
        *(calls([key], ["boom" if i == 5 else str(i)]) for i in range(10)),
        return_exceptions=True,
    )

    assert isinstance(results[5], ResponseError)
    assert [r for i, r in enumerate(results) if i != 5] == [
        [n + 1, str(i).encode()] for n, i in enumerate(i for i in range(10) if i != 5)
    ]


async def test_a_flushed_script_cache_is_reloaded_without_failing_a_call(
    redis: Redis, prefix: str
) -> None:
    calls = ScriptPipeline(redis, SCRIPT)
    key = f"{prefix}flush"
    assert await calls([key], ["a"]) == [1, b"a"]
    await redis.script_flush()  # as after a Redis restart

    alone = await calls([key], ["b"])
    await redis.script_flush()
    together = await asyncio.gather(*(calls([key], [c]) for c in "cdef"))

    assert alone == [2, b"b"]
    assert together == [[3, b"c"], [4, b"d"], [5, b"e"], [6, b"f"]]


async def test_an_unreachable_redis_fails_every_call_and_nothing_stays_stuck(prefix: str) -> None:
    # Nothing listens there; no retries, as app.core.lifespan configures the client.
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    calls = ScriptPipeline(dead, SCRIPT)
    try:
        for _ in range(2):  # the second round finds no batch task left hanging
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(calls([f"{prefix}dead"], [str(i)]) for i in range(5)),
                    return_exceptions=True,
                ),
                5.0,
            )
            assert all(isinstance(r, (RedisConnectionError, OSError)) for r in results), results
    finally:
        await dead.aclose()


async def test_a_caller_giving_up_leaves_the_others_their_results(
    redis: Redis, prefix: str
) -> None:
    calls = ScriptPipeline(redis, SCRIPT)
    key = f"{prefix}cancel"
    first = asyncio.create_task(calls([key], ["0"]))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(calls([key], [str(i)])) for i in range(1, 5)]
    await asyncio.sleep(0)
    waiting[1].cancel()

    assert await first == [1, b"0"]
    done = await asyncio.gather(*waiting, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert [d for i, d in enumerate(done) if i != 1] == [[2, b"1"], [4, b"3"], [5, b"4"]]


async def test_calls_queued_behind_a_failed_round_trip_fail_with_it_not_a_timeout_later(
    prefix: str,
) -> None:
    """A hung Redis: the first call times out; the calls made meanwhile do not each wait for a
    timeout of their own."""
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts, never answers
        port = hung.getsockname()[1]
        client = Redis(
            host="127.0.0.1", port=port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )  # as app.core.lifespan configures it: no retries
        calls = ScriptPipeline(client, SCRIPT)
        try:
            first = asyncio.create_task(calls([f"{prefix}hung"], ["0"]))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            queued = await asyncio.gather(
                *(calls([f"{prefix}hung"], [str(i)]) for i in range(1, 6)),
                return_exceptions=True,
            )
            waited = time.monotonic() - started
        finally:
            await client.aclose()
    with pytest.raises((TimeoutError, RedisTimeoutError)):
        await first
    assert all(isinstance(r, (TimeoutError, RedisTimeoutError)) for r in queued), queued
    assert waited < 0.5 + 0.3, waited  # the first call's timeout, not a second one


async def test_a_cancelled_pipeline_fails_its_callers_as_redis_unavailable(prefix: str) -> None:
    """At shutdown: nobody is left waiting, and the error is one callers treat as Redis down."""
    with socket.create_server(("127.0.0.1", 0)) as hung:
        client = Redis(host="127.0.0.1", port=hung.getsockname()[1], socket_timeout=5.0)
        calls = ScriptPipeline(client, SCRIPT)
        try:
            waiting = [asyncio.create_task(calls([f"{prefix}c"], [str(i)])) for i in range(3)]
            await asyncio.sleep(0.1)
            batch = calls._calls._task
            assert batch is not None
            batch.cancel()
            results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1.0)
        finally:
            await client.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results), results
