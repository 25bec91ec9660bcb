"""Infrastructure built at start and closed in reverse order at shutdown."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, cast

from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.maint_notifications import MaintNotificationsConfig
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.audit.service import AuditLog, AuditRecord
from app.auth.ratelimit import RateLimiter
from app.auth.service import Authenticator
from app.clients.service import ensure_admin_key
from app.core.config import Region, Settings
from app.core.db import create_engine, create_sessionmaker
from app.core.localcache import Invalidation
from app.integrations.phrase.client import PhraseIdmClient, build_http_client
from app.integrations.webhook import WebhookNotifier
from app.tokens.broker import Broker, CredentialSnapshot, RetryPolicy
from app.tokens.cache import REDIS_FAILURES, RedisCache, TieredCache
from app.tokens.circuit import CircuitBreaker
from app.tokens.lookup import CredentialDirectory
from app.tokens.refresher import Refresher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Infra:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    cache: TieredCache
    invalidation: Invalidation
    authenticator: Authenticator
    directory: CredentialDirectory
    broker: Broker
    refresher: Refresher
    ratelimiter: RateLimiter
    audit: AuditLog


CLUSTER_MAX_CONNECTIONS = 10_000  # per node; Redis's default maxclients


def create_redis(settings: Settings) -> Redis:
    assert settings.redis_url is not None
    # Short timeouts and no retries: a hung Redis must cost a request milliseconds, not the
    # seconds redis-py's default retry policy would spend.
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        # A burst opens connections by the dozen. Left to itself redis-py reads its own version
        # from the package metadata for every new connection: about 1.6 ms of CPU each.
        "driver_info": DriverInfo(lib_version=version("redis")),
    }
    url = settings.redis_url.get_secret_value()
    if settings.redis_cluster:
        # Every key tokenvend writes carries a hash tag, so a credential's entry, lock and
        # negative cache share a slot and its scripts run on one shard. No connection cap of
        # ours: redis-py's cluster client cannot wait for a free connection, so a cap (its own
        # default is 100 a node) fails a burst's commands with MaxConnectionsError, sends the
        # worker into degraded mode and lets it exchange under a local lock: a second exchange
        # for the credential. Redis's own limit (maxclients, 10,000 by default) still holds.
        cluster = RedisCluster.from_url(
            url,
            cluster_error_retry_attempts=1,
            max_connections=CLUSTER_MAX_CONNECTIONS,
            **options,
        )
        return cast(Redis, cluster)  # the same command surface for what tokenvend uses
    # A blocking pool: in a burst, a command waits for a free connection (up to the timeout)
    # rather than failing with "too many connections" and sending the worker into degraded mode.
    # No maintenance-notification handshake (a Redis Enterprise feature tokenvend does not use):
    # a round trip and about 0.5 ms of CPU less per new connection.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_seconds,
        health_check_interval=30,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **options,
    )
    return Redis.from_pool(pool)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        engine = create_engine(settings)
        stack.push_async_callback(engine.dispose)
        sessionmaker = create_sessionmaker(engine)

        redis = create_redis(settings) if settings.redis_url is not None else None
        if redis is not None:
            stack.push_async_callback(redis.aclose)
            if isinstance(redis, RedisCluster):
                # Learn the slot map now: left to the first requests, a cold burst initializes
                # the cluster client concurrently and some of those requests fail (500s seen).
                try:
                    await redis.initialize()
                except REDIS_FAILURES as exc:  # start degraded; the gate probes it later
                    log.warning("cache.redis.cluster_unreachable error=%s", type(exc).__name__)
        invalidation = Invalidation(redis, f"{settings.redis_prefix}generation")
        shared = None
        if redis is not None:
            shared = RedisCache(redis, settings.keyring, settings.redis_prefix)
        cache = TieredCache(shared, invalidation)

        http = build_http_client(
            connect_timeout=settings.upstream_connect_timeout_seconds,
            timeout=settings.upstream_timeout_seconds,
        )
        stack.push_async_callback(http.aclose)
        idm = PhraseIdmClient(
            http,
            {region: settings.phrase_url(region) for region in Region},
            max_response_bytes=settings.upstream_max_response_bytes,
            # httpx's timeouts are per step; this bounds the whole exchange, slow drips included.
            total_timeout=settings.upstream_timeout_seconds,
        )
        audit = AuditLog(sessionmaker)
        await audit.start()
        stack.push_async_callback(audit.stop)

        notifier = None
        if settings.webhook_url is not None and settings.webhook_secret is not None:
            notifier = WebhookNotifier(str(settings.webhook_url), settings.webhook_secret, http)
            stack.push_async_callback(notifier.drain)

        def status_changed(cred: CredentialSnapshot, event: str, code: str | None) -> None:
            audit.record(
                AuditRecord(
                    action=event,
                    outcome=code or "ok",
                    team=cred.team,
                    credential=cred.name,
                    details={"region": cred.region.value, "version": cred.version},
                )
            )
            invalidation.bump_soon()  # cached snapshots carry the old status
            if notifier is not None:
                notifier.notify(
                    event,
                    {
                        "team": cred.team,
                        "credential": cred.name,
                        "region": cred.region.value,
                        "error": code,
                    },
                )

        breaker = CircuitBreaker(
            redis,
            settings.redis_prefix,
            cache.gate,
            threshold=settings.circuit_failure_threshold,
            window=settings.circuit_window_seconds,
            cooldown=settings.circuit_cooldown_seconds,
        )
        broker = Broker(
            cache=cache,
            idm=idm,
            breaker=breaker,
            keyring=settings.keyring,
            sessionmaker=sessionmaker,
            expiry_margin=settings.expiry_margin_seconds,
            lock_ttl=settings.lock_ttl_seconds,
            rejected_retry=settings.rejected_retry_seconds,
            deadline=settings.request_deadline_seconds,
            retry=RetryPolicy(
                retries=settings.upstream_retries,
                backoff_base=settings.upstream_backoff_base_seconds,
                backoff_max=settings.upstream_backoff_max_seconds,
                retry_after_cap=settings.retry_after_cap_seconds,
            ),
            refresh_fraction=settings.refresh_fraction,
            refresh_jitter=settings.refresh_jitter,
            on_status_change=status_changed,
        )
        directory = CredentialDirectory(sessionmaker, invalidation)
        refresher = Refresher(
            broker=broker,
            cache=cache,
            directory=directory,
            redis=redis,
            prefix=settings.redis_prefix,
            interval=settings.refresh_interval_seconds,
            window=settings.refresh_window_seconds,
        )
        await refresher.start()
        stack.push_async_callback(refresher.stop)

        if settings.bootstrap_admin_key is not None:
            async with sessionmaker() as session, session.begin():
                created = await ensure_admin_key(
                    session, settings.bootstrap_admin_key.get_secret_value()
                )
            log.info("auth.bootstrap_admin %s", "created" if created else "present")

        app.state.infra = Infra(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            cache=cache,
            invalidation=invalidation,
            authenticator=Authenticator(sessionmaker, invalidation),
            directory=directory,
            broker=broker,
            refresher=refresher,
            ratelimiter=RateLimiter(
                redis,
                settings.redis_prefix,
                cache.gate,
                invalidation,
                burst=settings.rate_limit_burst,
            ),
            audit=audit,
        )
        log.info("service.started cache=%s", cache.name)
        # What start-up allocated lives as long as the process: keep it out of every GC pass,
        # and collect the young generation less often (the hot path allocates little that lives).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        yield
        log.info("service.stopping")
