from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from app.auth import keys
from app.clients.models import Client, Role
from app.clients.service import ensure_admin_key
from app.core.db import create_engine, create_sessionmaker
from tests.conftest import Env, make_settings

REPLICAS = 8


@pytest.mark.parametrize("backend", ["sqlite-memory", "postgres-redis"], indirect=True)
async def test_replicas_starting_together_share_one_bootstrap_admin(env: Env) -> None:
    # Every replica runs the bootstrap at start; losing the race must not fail a start.
    key = keys.issue_key().key.get_secret_value()
    engine = create_engine(make_settings(database_url=env.settings.database_url))
    maker = create_sessionmaker(engine)
    start = asyncio.Event()

    async def replica() -> bool:
        async with maker() as session, session.begin():
            await start.wait()
            return await ensure_admin_key(session, key)

    try:
        tasks = [asyncio.create_task(replica()) for _ in range(REPLICAS)]
        await asyncio.sleep(0.05)
        start.set()
        created = await asyncio.gather(*tasks)
        async with maker() as session:
            rows = (
                await session.scalars(select(Client).where(Client.key_id == keys.parse_key_id(key)))
            ).all()
    finally:
        await engine.dispose()
    assert created.count(True) == 1
    assert len(rows) == 1
    assert rows[0].role is Role.ADMIN
    assert not rows[0].disabled
    assert rows[0].key_digest == keys.digest(key)
