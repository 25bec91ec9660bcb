"""In-process caches kept honest across replicas.

The hot path (authenticate a key, find a credential, serve its cached JWT) reads process memory.
What makes that safe is a generation counter in Redis: every admin change increments it after its
transaction commits (`Invalidation.bump`), and every request reads it in the one Redis round trip
it makes anyway (pipelined with the rate-limit check, `app.auth.ratelimit`). A replica that sees a
new generation drops its in-process caches before the request goes on. So an admin change is
honoured by every replica from the next request on: no propagation delay, no reliance on pub/sub
delivery.

A request whose round trip fails (Redis down, hung or cut off) cannot know whether it missed a
change, so it does not trust process memory: it authenticates and looks the credential up in the
database. When Redis answers again it drops the caches if the generation moved, or if the outage
lasted more than a second (a change made meanwhile may have had its bump delayed). JWTs cached in
process memory are keyed by credential version, which comes from that fresh database read, so
they stay usable: a rotated API token's new version never matches an old JWT.

Without Redis (single process, memory backend) the counter is local and memory is always trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

# A single slow Redis call under load is not an outage; past this, memory is dropped on recovery.
# Above the gate's 1 s backoff, so one failed call followed by one skipped second is no outage.
GAP_FLUSH_SECONDS = 2.0

# Whether this request has confirmed, through Redis, that process memory is current.
_verified: ContextVar[bool] = ContextVar("cache_verified", default=False)


class Invalidation:
    def __init__(self, redis: Redis | None, key: str) -> None:
        self._redis = redis
        self.key = key
        self._seen: bytes | None = None
        self._unreachable_since: float | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.epoch = 0

    def trusted(self) -> bool:
        return self._redis is None or _verified.get()

    def flush_local(self) -> None:
        self.epoch += 1

    def observe(self, generation: bytes | None) -> None:
        """This request read `generation` from Redis: trust memory, after a flush if it changed,
        or if Redis was unreachable for longer than a blip (a change made then may have had its
        bump delayed or lost with the replica that made it)."""
        gap_since, self._unreachable_since = self._unreachable_since, None
        long_gap = gap_since is not None and time.monotonic() - gap_since > GAP_FLUSH_SECONDS
        if generation != self._seen or long_gap:
            self._seen = generation
            self.flush_local()
        _verified.set(True)

    def distrust(self) -> None:
        """This request could not reach Redis: memory may be stale, so the request reads the
        database instead."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
        _verified.set(False)

    async def bump(self) -> None:
        """An admin change committed: every replica drops its caches on its next request."""
        self.flush_local()
        await self._increment()

    def bump_soon(self) -> None:
        """`bump` from code that cannot await (a callback): flush now, increment in a task."""
        self.flush_local()
        self._increment_soon(delay=0.0)

    async def _increment(self) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.incr(self.key)
        except (RedisError, OSError, TimeoutError) as exc:
            # The change is committed but replicas that reach Redis would not see it: keep trying
            # (replicas that cannot reach Redis distrust their memory anyway). Only the increment
            # is retried: this replica flushed already, and flushing on every retry would drop
            # its JWTs each time, an exchange per hot credential per retry.
            log.error("cache.invalidation.bump_failed error=%s", type(exc).__name__)
            self._increment_soon(delay=0.5)

    def _increment_soon(self, delay: float) -> None:
        """Increments still waiting are coalesced: one covers every change before it."""
        if self._pending:
            return

        async def later() -> None:
            await asyncio.sleep(delay)
            self._pending.discard(task)
            await self._increment()

        task = asyncio.create_task(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


class LocalCache(Generic[K, V]):
    """A dict whose entries are valid while their epoch is current and their age under `max_age`.
    Bounded in size: when full it is simply cleared."""

    def __init__(self, invalidation: Invalidation, *, max_age: float, max_entries: int) -> None:
        self._inv = invalidation
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: dict[K, tuple[V, int, float]] = {}

    def get(self, key: K, *, verified: bool = True) -> V | None:
        """The entry, if current. `verified=False` reads it before this request has checked the
        generation; the caller must then re-check once it has (see `app.auth.dependencies`)."""
        found = self._entries.get(key)
        if found is None:
            return None
        value, epoch, until = found
        if epoch != self._inv.epoch or time.monotonic() >= until:
            self._entries.pop(key, None)
            return None
        if verified and not self._inv.trusted():
            return None
        return value

    def put(self, key: K, value: V, epoch: int) -> None:
        """Store `value` read while the invalidation was at `epoch` (taken before the read, so a
        flush that raced the read makes the entry void instead of resurrecting stale data)."""
        if epoch != self._inv.epoch:
            return
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (value, epoch, time.monotonic() + self._max_age)

    def __len__(self) -> int:
        return len(self._entries)


class Coalescer(Generic[K, V]):
    """Concurrent loads of one key share one task: a burst of requests with a cold cache makes
    one database query per key, not one per request (which would drain the connection pool)."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}

    async def load(self, key: K, loader: Callable[[], Coroutine[Any, Any, V]]) -> V:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(loader())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        # Shielded: one caller giving up must not cancel the load the others wait for.
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure every waiter gave up on is not "lost"


class Batcher(Generic[K, V]):
    """Concurrent loads share one round trip. The first key starts a batch at once (idle, a load
    costs what it always did); keys asked for while that batch runs wait for the next one, which
    takes all of them. So a burst of a hundred cold keys makes a handful of queries on one pooled
    connection instead of a hundred transactions that drain the pool and open new connections.

    `load_many` returns, for each key, its value or the exception its callers get; a key it leaves
    out fails its callers. Equal keys share one load. When `load_many` itself fails (the database
    or Redis down or hung), that batch's callers get its error, and so do the keys queued behind
    it: they would only meet the same failure, one timeout later. At shutdown (the batch task
    cancelled) every waiting caller gets `cancelled_error`.
    """

    def __init__(
        self,
        load_many: Callable[[list[K]], Coroutine[Any, Any, Mapping[K, V | Exception]]],
        *,
        max_batch: int = 100,
        cancelled_error: type[Exception] = RuntimeError,
    ) -> None:
        self._load_many = load_many
        self._max_batch = max_batch
        self._cancelled_error = cancelled_error
        self._futures: dict[K, asyncio.Future[V]] = {}  # queued or being loaded
        self._queue: list[K] = []
        self._task: asyncio.Task[None] | None = None

    async def load(self, key: K) -> V:
        # Shielded: one caller giving up must not cancel the load the others wait for.
        return await asyncio.shield(self._future(key))

    async def load_own(self, key: K) -> V:
        """`load` for a key nobody else asks for (a numbered call): no shield, a few microseconds
        less per call on the hot path; a caller giving up cancels only its own result (the key is
        loaded all the same)."""
        return await self._future(key)

    def _future(self, key: K) -> asyncio.Future[V]:
        future = self._futures.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            # Retrieved, so a failure every caller gave up on is not reported as lost.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._futures[key] = future
            self._queue.append(key)
            if self._task is None:
                self._task = asyncio.create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._queue:
                keys = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                try:
                    results: Mapping[K, V | Exception] = await self._load_many(keys)
                except Exception as exc:
                    keys += self._queue
                    self._queue.clear()
                    results = dict.fromkeys(keys, exc)
                for key in keys:
                    future = self._futures.pop(key)
                    if future.done():  # its only caller gave up (`load_own`)
                        continue
                    result = results.get(key)
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    elif result is None and key not in results:
                        future.set_exception(LookupError("the batch left a key out"))
                    else:
                        future.set_result(result)  # type: ignore[arg-type]
        finally:
            self._task = None
            # Cancelled (shutdown): nobody will load what is left, so nobody may wait for it.
            for future in self._futures.values():
                if not future.done():
                    future.set_exception(self._cancelled_error("the batch was cancelled"))
            self._futures.clear()
            self._queue.clear()
