"""Request-scoped dependencies that read the infrastructure from the app state."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.service import CHANGED
from app.core.errors import DatabaseUnavailable
from app.core.lifespan import Infra
from app.core.schemas import MAX_PAGE


async def get_infra(request: Request) -> Infra:
    # async: a plain `def` dependency would run in a worker thread on every request.
    infra: Infra = request.app.state.infra
    return infra


InfraDep = Annotated[Infra, Depends(get_infra)]


async def get_session(infra: InfraDep) -> AsyncIterator[AsyncSession]:
    """The request's transaction: committed once when the route returns, rolled back on error.
    After a committed admin change, every replica drops its in-process caches on its next
    request (the cache generation is bumped)."""
    async with infra.sessionmaker() as session:
        try:
            async with session.begin():
                yield session
        except OSError as exc:
            # A refused or timed-out connect: asyncpg raises it bare and SQLAlchemy does not wrap
            # it, so it would read as some dependency; in this transaction it is the database.
            raise DatabaseUnavailable("the database did not answer in time") from exc
        if session.info.get(CHANGED):
            await infra.invalidation.bump()


# scope="function": the commit happens before the response is sent, so a failed commit is an
# error response rather than a success that did not persist.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


class Paging:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page size.")] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000, description="Items to skip.")] = 0,
    ) -> None:
        self.limit = limit
        self.offset = offset


PagingDep = Annotated[Paging, Depends()]
