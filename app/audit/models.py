from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import JSON, BigInteger, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow


class AuditEvent(Base):
    """Who did what to which team, and how it ended. Never a secret; a JWT only as a digest prefix.

    The actor is kept as a bare id (no foreign key) so deleting a client keeps its history.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_team_at", "team", "at"),
        Index("ix_audit_events_actor_at", "actor_client_id", "at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    actor_client_id: Mapped[uuid.UUID | None]
    action: Mapped[str] = mapped_column(String(63), index=True)
    team: Mapped[str | None] = mapped_column(String(63))
    credential: Mapped[str | None] = mapped_column(String(63))
    outcome: Mapped[str] = mapped_column(String(63))
    cache: Mapped[str | None] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(64))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    jwt_sha256: Mapped[str | None] = mapped_column(String(16))
    details: Mapped[dict[str, object] | None] = mapped_column(JSON)
