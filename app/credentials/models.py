from __future__ import annotations

import datetime as dt
import enum
import uuid

from sqlalchemy import Date, ForeignKey, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.config import Region
from app.core.db import Base, str_enum, utcnow


class CredentialStatus(enum.StrEnum):
    ACTIVE = "active"
    REJECTED = "rejected"
    DISABLED = "disabled"


class Credential(Base):
    """A team's Phrase API token. The token itself is only ever stored sealed (AES-256-GCM)."""

    __tablename__ = "credentials"
    __table_args__ = (UniqueConstraint("team_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    region: Mapped[Region] = mapped_column(str_enum(Region, "region"))
    product: Mapped[str | None] = mapped_column(String(63))
    api_token_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    api_token_key_id: Mapped[str] = mapped_column(String(32), index=True)
    api_token_hint: Mapped[str] = mapped_column(String(4))
    status: Mapped[CredentialStatus] = mapped_column(
        str_enum(CredentialStatus, "credential_status"), default=CredentialStatus.ACTIVE
    )
    version: Mapped[int] = mapped_column(default=1)
    last_exchange_at: Mapped[dt.datetime | None]
    last_error_code: Mapped[str | None] = mapped_column(String(63))
    last_error_at: Mapped[dt.datetime | None]
    expires_on: Mapped[dt.date | None] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return f"Credential(id={self.id}, name={self.name!r}, version={self.version})"

    @property
    def aad(self) -> bytes:
        """Binds the ciphertext to this row: moved to another row, it no longer opens."""
        return api_token_aad(self.id)


def api_token_aad(cred_id: uuid.UUID) -> bytes:
    return f"tokenvend:credential:{cred_id}:api_token".encode()
