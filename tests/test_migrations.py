"""Alembic migrations on both backends: they go up, come all the way down, go up again, and leave
a schema identical to the models (no drift that `alembic check` would report).

The tests are synchronous on purpose: migrations/env.py runs its own event loop (`asyncio.run`).
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, pool
from sqlalchemy.ext.asyncio import create_async_engine

import app
from app.cli import ROOT
from app.core.db import Base
from tests.fixtures.services import asyncpg_url, fresh_database

VERSION_TABLE = "alembic_version"


def _import_every_model_module() -> None:
    """Every `app.<domain>.models`, found by walking the package: a new domain's tables join the
    drift check without anyone remembering to list them here."""
    for module in pkgutil.walk_packages(app.__path__, "app."):
        if module.name.endswith(".models"):
            importlib.import_module(module.name)


_import_every_model_module()


def alembic_config(url: str) -> Config:
    # Built like app.cli.upgrade_database builds it, so these tests run what the CLI runs.
    config = Config()
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    return config


def _inspect_sync(connection: Connection) -> dict[str, Any]:
    tables = set(inspect(connection).get_table_names())
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    diff = compare_metadata(context, Base.metadata) if tables - {VERSION_TABLE} else []
    return {"tables": tables, "diff": diff, "revision": context.get_current_revision()}


def inspect_schema(url: str) -> dict[str, Any]:
    """Tables, current revision and the autogenerate diff against the models, in one connection."""

    async def run() -> dict[str, Any]:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(_inspect_sync)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each backend, thrown away after the test."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    with fresh_database("migrations") as name:
        yield asyncpg_url(name)


def head_revision(config: Config) -> str:
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


class TestMigrations:
    def test_upgrade_creates_every_model_table_at_head(self, database_url: str) -> None:
        config = alembic_config(database_url)
        command.upgrade(config, "head")

        schema = inspect_schema(database_url)
        assert schema["tables"] == set(Base.metadata.tables) | {VERSION_TABLE}
        assert schema["revision"] == head_revision(config)

    def test_schema_after_upgrade_matches_the_models(self, database_url: str) -> None:
        command.upgrade(alembic_config(database_url), "head")

        assert inspect_schema(database_url)["diff"] == []

    def test_downgrade_to_base_drops_every_table_and_upgrade_recreates_them(
        self, database_url: str
    ) -> None:
        config = alembic_config(database_url)
        command.upgrade(config, "head")

        command.downgrade(config, "base")
        down = inspect_schema(database_url)
        assert down["tables"] <= {VERSION_TABLE}
        assert down["revision"] is None

        command.upgrade(config, "head")
        up = inspect_schema(database_url)
        assert up["tables"] == set(Base.metadata.tables) | {VERSION_TABLE}
        assert up["revision"] == head_revision(config)
        assert up["diff"] == []
