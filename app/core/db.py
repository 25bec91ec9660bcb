"""Async engine and sessions.

Timeouts are about a second everywhere (pool checkout, connect, statement) so a sick database
turns into a fast 503 instead of requests piling up behind SQLAlchemy's 30 s pool default.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from sqlalchemy import DateTime, Enum, MetaData, TypeDecorator, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from app.core.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime}


def str_enum(cls: type[enum.Enum], name: str) -> Enum:
    """A StrEnum stored as a plain string with a CHECK constraint: portable across backends."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_engine(settings: Settings) -> AsyncEngine:
    url = settings.database_url.get_secret_value()
    timeout = settings.db_timeout_seconds
    # No pre-ping: it costs a round trip per checkout on the hot path; a connection that died
    # with a restarted server fails one query, and SQLAlchemy then discards the whole pool.
    kwargs: dict[str, Any] = {}
    if settings.is_sqlite:
        kwargs["connect_args"] = {"timeout": max(timeout, 5.0)}  # busy timeout for the file lock
    else:
        kwargs |= {
            "pool_size": 20,
            "max_overflow": 20,
            "pool_timeout": timeout,
            "pool_recycle": 1800,
            "connect_args": {
                "timeout": timeout,
                # The client gives up after `timeout` (a hung server costs a request about a
                # second); the server-side statement timeout is a backstop.
                "command_timeout": timeout,
                "server_settings": {
                    "statement_timeout": str(int(max(timeout * 2, 2.0) * 1000)),
                    "application_name": "tokenvend",
                },
            },
        }
    engine = create_async_engine(url, **kwargs)
    if not settings.is_sqlite:

        @event.listens_for(engine.sync_engine, "invalidate")
        def _drop_at_once(dbapi_conn: Any, _record: Any, _exc: BaseException | None) -> None:
            # A connection discarded after an error (a timeout: the server may be hung). Left to
            # itself, SQLAlchemy first tries a graceful close, which waits for the server once
            # more (about a second on a hung one) before it gives up; the request waits with it.
            # Closing the socket at once tells the server just as well.
            driver = getattr(dbapi_conn, "driver_connection", None)
            if driver is not None and not driver.is_closed():
                driver.terminate()

    if settings.is_sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


async def session_scope(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction: commit on success, roll back on any error."""
    async with maker() as session, session.begin():
        yield session
