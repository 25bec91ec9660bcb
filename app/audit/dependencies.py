from __future__ import annotations

from typing import Any

from fastapi import Request

from app.audit.service import AuditRecord


def request_record(
    request: Request, action: str, outcome: str = "ok", **fields: Any
) -> AuditRecord:
    """An audit record filled with what the request knows: actor, request id, remote address."""
    client = getattr(request.state, "client", None)
    return AuditRecord(
        action=action,
        outcome=outcome,
        actor_client_id=client.id if client is not None else None,
        request_id=getattr(request.state, "request_id", None),
        remote_addr=request.client.host if request.client else None,
        **fields,
    )
