"""Infrastructure built at start and closed in reverse order at shutdown."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.audit.service import AuditLog
from app.clients.service import ensure_admin_key
from app.core.config import Region, Settings
from app.core.db import create_engine, create_sessionmaker
from app.integrations.phrase.client import PhraseIdmClient, build_http_client
from app.tokens.broker import Broker
from app.tokens.cache import MemoryCache, RedisCache, TokenCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Infra:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    cache: TokenCache
    broker: Broker
    audit: AuditLog


def create_redis(settings: Settings) -> Redis:
    assert settings.redis_url is not None
    # Short timeouts and no retries: a hung Redis must cost a request milliseconds, not the
    # seconds redis-py's default retry policy would spend.
    return Redis.from_url(
        settings.redis_url.get_secret_value(),
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
        max_connections=256,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with AsyncExitStack() as stack:
        engine = create_engine(settings)
        stack.push_async_callback(engine.dispose)
        sessionmaker = create_sessionmaker(engine)

        cache: TokenCache
        if settings.redis_url is not None:
            cache = RedisCache(create_redis(settings), settings.keyring, settings.redis_prefix)
        else:
            cache = MemoryCache()
        stack.push_async_callback(cache.close)

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
        broker = Broker(
            cache=cache,
            idm=idm,
            keyring=settings.keyring,
            sessionmaker=sessionmaker,
            expiry_margin=settings.expiry_margin_seconds,
            lock_ttl=settings.lock_ttl_seconds,
            rejected_retry=settings.rejected_retry_seconds,
        )
        audit = AuditLog(sessionmaker)
        await audit.start()
        stack.push_async_callback(audit.stop)

        if settings.bootstrap_admin_key is not None:
            async with sessionmaker() as session, session.begin():
                created = await ensure_admin_key(
                    session, settings.bootstrap_admin_key.get_secret_value()
                )
            log.info("auth.bootstrap_admin %s", "created" if created else "present")

        app.state.infra = Infra(settings, engine, sessionmaker, cache, broker, audit)
        log.info("service.started cache=%s", cache.name)
        yield
        log.info("service.stopping")
