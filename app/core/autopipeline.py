"""Concurrent calls of one Redis script share a round trip (auto-pipelining).

Every authenticated request makes one Redis call (the rate limit, `app.auth.ratelimit`), and most
of what redis-py spends on a call is per round trip: taking a pooled connection, its health check,
a timeout context, a write and a read. Under load dozens of requests wait on Redis at once. So the
first call goes out at once, exactly as it would alone; calls made while it is in flight leave
together, as one pipeline, when it returns. Each call still runs on its own in Redis, in the order
the calls were made, and gets its own result or error; a failed round trip (timeout, connection
lost) fails every call in it, as it would have failed each of them alone, and the calls queued
behind it with it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

Call = tuple[Sequence[str], Sequence[str], "asyncio.Future[Any]"]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A failure whose caller gave up in between is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class ScriptPipeline:
    def __init__(self, redis: Redis, script: str, *, max_batch: int = 64) -> None:
        self._redis = redis
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._max_batch = max_batch
        self._queue: list[Call] = []
        self._task: asyncio.Task[None] | None = None
        self.round_trips = 0  # for tests and curiosity: calls / round_trips is the batch size

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._queue.append((keys, args, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        batch: list[Call] = []
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results = await self._execute(batch)
                except Exception as exc:
                    # The round trip failed (a hung or lost Redis): the calls queued meanwhile
                    # would wait for the same failure, one more timeout later. They fail now.
                    batch += self._queue
                    self._queue.clear()
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():  # its caller was cancelled; the call ran all the same
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        finally:
            self._task = None
            # Cancelled (shutdown): nobody will send what is left, so nobody may wait for it.
            for _, _, future in (*batch, *self._queue):
                if not future.done():
                    # As a connection error: callers handle it as Redis being unavailable.
                    future.set_exception(RedisConnectionError("the Redis pipeline was cancelled"))
            self._queue.clear()

    async def _execute(self, batch: list[Call]) -> list[Any]:
        results = await self._send(batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:  # a restarted or flushed Redis: load the script once, send those again
            await self._redis.script_load(self._script)
            again = await self._send([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _send(self, batch: list[Call]) -> list[Any]:
        self.round_trips += 1
        if len(batch) == 1:  # alone: the plain call, without a pipeline's bookkeeping
            keys, args, _ = batch[0]
            try:
                return [await self._redis.evalsha(self._sha, len(keys), *keys, *args)]
            except NoScriptError as exc:
                return [exc]
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results
