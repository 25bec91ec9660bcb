from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.audit import service
from app.audit.schemas import AuditEventRead
from app.auth.dependencies import Admin
from app.core.deps import InfraDep, PagingDep, SessionDep
from app.core.problems import AUTHENTICATED, responses
from app.core.schemas import SLUG_PATTERN, Page

router = APIRouter(prefix="/v1/audit-events", tags=["audit"], responses=responses(*AUTHENTICATED))


@router.get(
    "",
    response_model=Page[AuditEventRead],
    operation_id="listAuditEvents",
    summary="Read the audit trail",
)
async def list_audit_events(
    _admin: Admin,
    session: SessionDep,
    infra: InfraDep,
    paging: PagingDep,
    team: Annotated[str | None, Query(pattern=SLUG_PATTERN, max_length=63)] = None,
    client_id: uuid.UUID | None = None,
    action: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9.-]{0,62}$")] = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> Page[AuditEventRead]:
    """Newest first. Vends are written in batches within about a second."""
    await infra.audit.flush()  # an admin reading the trail sees what just happened
    events = await service.list_events(
        session,
        team=team,
        client_id=client_id,
        action=action,
        since=since,
        until=until,
        limit=paging.limit + 1,
        offset=paging.offset,
    )
    return Page.of(
        [AuditEventRead.model_validate(e) for e in events], limit=paging.limit, offset=paging.offset
    )
