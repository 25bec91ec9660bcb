"""In-process caches kept honest across replicas.

The hot path (authenticate a key, find a credential, serve its cached JWT) reads only process
memory. What makes that safe is `Invalidation`: every admin change publishes a flush on a Redis
pub/sub channel after its transaction commits, and every replica drops its in-process caches when
the message arrives.

Pub/sub delivers nothing to a replica whose connection is down or hung, so a replica trusts its
caches only while it can prove its subscription is alive: it pings through the subscription every
`trust / 4` seconds and trusts its caches until `trust` seconds after the last answer. After any gap
it drops everything before trusting again, since it may have missed a flush. The bound: a replica
serves an in-process entry at most `trust` seconds (TOKENVEND_LOCAL_TRUST_SECONDS, default 2) after
it last heard from Redis; while it cannot hear, it asks the database instead.

Without Redis (single process, memory backend) flushes are local calls and the caches are always
trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

FLUSH = b"flush"


class Invalidation:
    def __init__(self, redis: Redis | None, channel: str, trust_seconds: float) -> None:
        self._redis = redis
        self._channel = channel
        self._trust = trust_seconds
        self._trusted_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.epoch = 0

    def trusted(self) -> bool:
        return self._redis is None or time.monotonic() < self._trusted_until

    @property
    def subscribed(self) -> bool:
        return self.trusted()

    def flush_local(self) -> None:
        self.epoch += 1

    async def publish(self) -> None:
        """Flush this replica now and every other replica when the message arrives."""
        self.flush_local()
        if self._redis is None:
            return
        try:
            await self._redis.publish(self._channel, FLUSH)
        except RedisError as exc:
            # The change is committed; replicas that miss the flush stop trusting their caches
            # within the trust bound because their own pings fail the same way.
            log.warning("cache.invalidation.publish_failed error=%s", type(exc).__name__)

    def publish_soon(self) -> None:
        """`publish` from code that cannot await (a callback); the task is kept until done."""
        task = asyncio.create_task(self.publish())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def start(self) -> None:
        if self._redis is not None:
            self._task = asyncio.create_task(self._listen(), name="cache-invalidation")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _listen(self) -> None:
        assert self._redis is not None
        interval = self._trust / 4
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                # A new subscription may follow a gap in which flushes were missed.
                self.flush_local()
                next_ping = 0.0
                while True:
                    now = time.monotonic()
                    if now >= next_ping:
                        await pubsub.ping()
                        next_ping = now + interval
                    message = await pubsub.get_message(timeout=interval)
                    if message is None:
                        continue
                    if message["type"] in ("pong", "subscribe"):
                        if not self.trusted():
                            self.flush_local()  # we were deaf for a while: start clean
                        self._trusted_until = time.monotonic() + self._trust
                    elif message["type"] == "message":
                        self.flush_local()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                log.warning("cache.invalidation.disconnected error=%s", type(exc).__name__)
                self._trusted_until = 0.0
                await asyncio.sleep(interval)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


class LocalCache(Generic[K, V]):
    """A dict whose entries are valid while the invalidation is trusted, its epoch unchanged and
    their own age under `max_age`. Bounded in size: when full it is simply cleared."""

    def __init__(self, invalidation: Invalidation, *, max_age: float, max_entries: int) -> None:
        self._inv = invalidation
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: dict[K, tuple[V, int, float]] = {}

    def get(self, key: K) -> V | None:
        found = self._entries.get(key)
        if found is None:
            return None
        value, epoch, until = found
        if epoch != self._inv.epoch or time.monotonic() >= until or not self._inv.trusted():
            self._entries.pop(key, None)
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
