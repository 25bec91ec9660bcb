"""The audit trail.

Admin changes are written in the same transaction as the change itself (`add`), so a change and its
record commit or roll back together. Vends are many and on the hot path, so they are buffered
(`AuditLog.record`) and written in batches by a background task, and flushed on shutdown.

Nothing buffered is dropped: a failed batch goes back to the buffer. The buffer rides out a short
database outage, but it is bounded: once `max_pending` events wait, or writes have failed for
`max_unwritten_seconds`, `accepting()` turns false and the token routes refuse to vend (fail
closed) until the trail can be written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit.models import AuditEvent
from app.core.db import utcnow
from app.core.errors import DependencyUnavailable
from app.metrics.registry import AUDIT_PENDING

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AuditRecord:
    action: str
    outcome: str
    actor_client_id: uuid.UUID | None = None
    team: str | None = None
    credential: str | None = None
    cache: str | None = None
    request_id: str | None = None
    remote_addr: str | None = None
    jwt_sha256: str | None = None
    details: dict[str, Any] | None = None
    at: dt.datetime = field(default_factory=utcnow)


CHANGED = "tokenvend.changed"


_FIELDS = tuple(f.name for f in fields(AuditRecord))
_TABLE = AuditEvent.metadata.tables[AuditEvent.__tablename__]
_PLAIN = tuple(name for name in _FIELDS if name != "details")  # COPY sends JSON as text


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _row(record: AuditRecord) -> dict[str, Any]:
    # Shallow: dataclasses.asdict deep-copies every value, a measurable cost at vend rates.
    return {name: getattr(record, name) for name in _FIELDS}


async def _write(session: AsyncSession, batch: Sequence[AuditRecord]) -> None:
    """One batch in the session's transaction. On PostgreSQL by COPY, which costs a third of the
    CPU of an INSERT per row (the writer shares the process with the vends it records)."""
    conn = await session.connection()
    if conn.dialect.driver == "asyncpg":
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        rows = [
            (
                *(getattr(r, name) for name in _PLAIN),
                None if r.details is None else _json(r.details),
            )
            for r in batch
        ]
        try:
            await raw.copy_records_to_table(
                AuditEvent.__tablename__, records=rows, columns=(*_PLAIN, "details")
            )
        except BaseException:
            # Past SQLAlchemy, so its disconnect handling is ours: a connection in an unknown
            # state must not go back to the pool.
            await conn.invalidate()
            raise
    else:
        await conn.execute(insert(_TABLE), [_row(r) for r in batch])


def add(session: AsyncSession, record: AuditRecord) -> None:
    """Record an admin change in the change's own transaction. Every admin change is audited, so
    this also marks the session: its commit is followed by a flush of every replica's in-process
    caches (`app.core.deps.get_session`)."""
    session.add(AuditEvent(**_row(record)))
    session.info[CHANGED] = True


class AuditUnavailable(DependencyUnavailable):
    code = "audit-unavailable"
    title = "Audit trail unavailable"


class AuditLog:
    """Buffers records and writes them in batches; `flush` drains everything (shutdown)."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        *,
        interval: float = 0.5,
        batch: int = 500,
        max_pending: int = 20_000,
        max_unwritten_seconds: float = 30.0,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._interval = interval
        self._batch = batch
        self._max_pending = max_pending
        self._max_unwritten = max_unwritten_seconds
        self._buffer: list[AuditRecord] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._failing_since: float | None = None
        self._writing = 0  # records taken by a write that has not finished

    def record(self, record: AuditRecord) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self._batch:
            self._wake.set()

    def accepting(self) -> bool:
        """False when another vend could not be audited in time: the caller must refuse."""
        if self.pending >= self._max_pending:
            return False
        failing = self._failing_since
        return failing is None or time.monotonic() - failing < self._max_unwritten

    def ensure_accepting(self) -> None:
        if not self.accepting():
            raise AuditUnavailable(
                "the audit trail cannot be written; tokens are not vended unaudited", retry_after=5
            )

    @property
    def pending(self) -> int:
        """Records not written yet: in the buffer, or in a write under way (which may hang as
        long as the database does)."""
        return len(self._buffer) + self._writing

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        if self._task is not None:
            # A write under way finishes first (bounded by the database timeouts): cancelled in
            # the middle of its transaction it could leave the connection holding a lock (SQLite
            # then refuses the final flush below with "database is locked").
            async with self._lock:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:  # the writer outlives any failed batch; the batch is kept
                log.warning(
                    "audit.flush.failed pending=%d error=%s", self.pending, type(exc).__name__
                )
            AUDIT_PENDING.set(self.pending)

    async def flush(self) -> None:
        async with self._lock:
            batch, self._buffer = self._buffer, []
            if not batch:
                return
            self._writing = len(batch)
            try:
                async with self._sessionmaker() as session, session.begin():
                    await _write(session, batch)
            except BaseException:
                self._buffer[:0] = batch  # keep them for the next attempt; nothing is lost
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                raise
            finally:
                self._writing = 0
            self._failing_since = None


async def list_events(
    session: AsyncSession,
    *,
    team: str | None,
    client_id: uuid.UUID | None,
    action: str | None,
    since: dt.datetime | None,
    until: dt.datetime | None,
    limit: int,
    offset: int,
) -> Sequence[AuditEvent]:
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    if team is not None:
        query = query.where(AuditEvent.team == team)
    if client_id is not None:
        query = query.where(AuditEvent.actor_client_id == client_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if until is not None:
        query = query.where(AuditEvent.at < until)
    return (await session.scalars(query.limit(limit).offset(offset))).all()
