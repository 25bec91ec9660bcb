from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, str_enum, utcnow


class Role(enum.StrEnum):
    ADMIN = "admin"
    CLIENT = "client"


ALL_TEAMS = "*"


class Client(Base):
    """An internal service or an admin. Only a digest of its API key is stored."""

    __tablename__ = "clients"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[Role] = mapped_column(str_enum(Role, "role"))
    teams: Mapped[list[str]] = mapped_column(JSON, default=list)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_digest: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the whole key
    disabled: Mapped[bool] = mapped_column(default=False)
    rate_limit_per_second: Mapped[float | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_used_at: Mapped[dt.datetime | None]

    def __repr__(self) -> str:
        return f"Client(id={self.id}, name={self.name!r}, role={self.role})"

    def may_access(self, team_slug: str) -> bool:
        return self.role is Role.ADMIN or ALL_TEAMS in self.teams or team_slug in self.teams
