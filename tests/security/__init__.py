"""Security properties of tokenvend, proven with real components (issue 4).

Each module proves one property and can fail: the route inventory gate, the authorization matrix,
the canary search for leaked secrets, ciphertext integrity, encryption key rotation, rate limits,
hardened HTTP defaults, the fail-closed audit trail, and static checks (bandit, secret
comparisons). Run `pytest tests/security -s` to see the printed matrix and search summaries.

Helpers shared by the modules live here (the package has no conftest of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.core.config import Settings
from app.main import create_app


async def settle_background_tasks(app: FastAPI) -> None:
    """End the app's background tasks by cancelling them until they are done, before the
    lifespan's own `stop()` runs (which then finds them finished).

    Works around a shutdown hang these tests ran into: on Python 3.11 `asyncio.wait_for`, which
    redis-py wraps around every socket write, returns the inner result and drops a cancellation
    that arrives just as the inner call completes (fixed in 3.12). A task cancelled once inside
    a Redis call can so go on running, and `Refresher.stop()` (one `cancel()`, then an unbounded
    `await`) waits forever. Reported with a patch for app/tokens/refresher.py."""
    infra = getattr(app.state, "infra", None)
    if infra is None:
        return
    for owner in (infra.refresher, infra.audit):
        task = owner._task
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)


@pytest.fixture
async def settled_app(app: FastAPI) -> AsyncIterator[FastAPI]:
    """The `app` fixture, with its background tasks settled before its lifespan ends."""
    yield app
    await settle_background_tasks(app)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """An application built from `settings`, started, with an HTTP client over ASGI."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://tokenvend.test", timeout=30.0
            ) as http:
                yield app, http
        finally:
            await settle_background_tasks(app)
