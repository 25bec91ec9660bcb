from __future__ import annotations

from typing import Any

from fastapi import Request

from app.audit.service import AuditRecord


def request_record(
    request: Request, action: str, outcome: str = "ok", **fields: Any
) -> AuditRecord:
    """An audit record filled with what the request knows: actor, request id, remote address."""
    scope = request.scope
    state = scope.get("state") or {}  # what `request.state` reads, without building it
    client = state.get("client")
    peer = scope.get("client")
    return AuditRecord(
        action=action,
        outcome=outcome,
        actor_client_id=client.id if client is not None else None,
        request_id=state.get("request_id"),
        remote_addr=peer[0] if peer else None,
        **fields,
    )
