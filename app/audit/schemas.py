from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from app.core.schemas import Schema


class AuditEventRead(Schema):
    id: int
    at: dt.datetime
    actor_client_id: uuid.UUID | None
    action: str
    team: str | None
    credential: str | None
    outcome: str
    cache: str | None
    request_id: str | None
    remote_addr: str | None
    jwt_sha256: str | None
    details: dict[str, Any] | None
