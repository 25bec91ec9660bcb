"""Alembic environment: async engines for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

import app.audit.models
import app.clients.models
import app.credentials.models
import app.teams.models  # noqa: F401  (register every table on the metadata)
from app.core.config import DatabaseSettings
from app.core.db import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    # The CLI passes the URL in; the plain `alembic` command reads TOKENVEND_DATABASE_URL / .env.
    url = config.attributes.get("database_url")
    return url or DatabaseSettings().database_url.get_secret_value()


def run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER by copying the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
