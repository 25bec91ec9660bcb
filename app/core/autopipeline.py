"""Concurrent calls of one Redis script share a round trip (auto-pipelining).

Every authenticated request makes one Redis call (the rate limit, `app.auth.ratelimit`), and most
of what redis-py spends on a call is per round trip: taking a pooled connection, its health check,
a timeout context, a write and a read. Under load dozens of requests wait on Redis at once. So the
calls go through a `Batcher`: the first goes out at once, exactly as it would alone; calls made
while it is in flight leave together, as one pipeline, when it returns. Each call still runs on its
own in Redis, in the order the calls were made, and gets its own result or error; a failed round
trip (timeout, connection lost) fails every call in it, as it would have failed each of them
alone, and the calls queued behind it with it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from app.core.localcache import Batcher

# (a number of its own, so that calls are never merged however alike; keys; args)
Call = tuple[int, tuple[str, ...], tuple[str, ...]]


class ScriptPipeline:
    def __init__(self, redis: Redis, script: str, *, max_batch: int = 64) -> None:
        self._redis = redis
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        # Cancelled at shutdown: a connection error, which callers handle as Redis unavailable.
        self._calls: Batcher[Call, Any] = Batcher(
            self._execute, max_batch=max_batch, cancelled_error=RedisConnectionError
        )
        self._numbers = itertools.count()
        self.round_trips = 0  # for tests and curiosity: calls / round_trips is the batch size

    async def __call__(self, keys: Sequence[str], args: Sequence[str]) -> Any:
        return await self._calls.load_own((next(self._numbers), tuple(keys), tuple(args)))

    async def _execute(self, batch: list[Call]) -> dict[Call, Any]:
        results = await self._send(batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:  # a restarted or flushed Redis: load the script once, send those again
            await self._redis.script_load(self._script)
            again = await self._send([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return dict(zip(batch, results, strict=True))

    async def _send(self, batch: list[Call]) -> list[Any]:
        self.round_trips += 1
        if len(batch) == 1:  # alone: the plain call, without a pipeline's bookkeeping
            _, keys, args = batch[0]
            try:
                return [await self._redis.evalsha(self._sha, len(keys), *keys, *args)]
            except NoScriptError as exc:
                return [exc]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, keys, args in batch:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results
