"""Authentication (who is calling) and authorization (may they) as FastAPI dependencies.

Every lookup reads the database, so disabling, deleting or rotating a client's key takes effect
on that key's next request on every replica. The lookup uses its own short transaction: the
token route must not hold a pooled connection while it waits for an exchange.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.audit.service import AuditLog, AuditRecord
from app.auth import keys
from app.clients.models import Client, Role
from app.clients.service import find_by_key_id
from app.core.db import utcnow
from app.core.deps import InfraDep
from app.core.errors import AuthenticationFailed, PermissionDenied

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ClientKey",
    bearerFormat="tvk_<key id>_<secret>",
    description="A tokenvend client API key, as printed by `tokenvend admin create-key` or "
    "returned by `POST /v1/clients`.",
)

LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


class TeamNotGranted(PermissionDenied):
    code = "team-not-granted"
    title = "Team not granted"


def denial(request: Request, outcome: str, actor: Client | None, team: str | None) -> AuditRecord:
    return AuditRecord(
        action="auth.denied",
        outcome=outcome,
        actor_client_id=actor.id if actor else None,
        team=team,
        request_id=getattr(request.state, "request_id", None),
        remote_addr=request.client.host if request.client else None,
        details={
            "method": request.method,
            "route": getattr(request.scope.get("route"), "path", None),
        },
    )


async def current_client(
    request: Request,
    infra: InfraDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Client:
    key = credentials.credentials.strip() if credentials else ""
    key_id = keys.parse_key_id(key)
    client = None
    if key_id is not None:
        async with infra.sessionmaker() as session, session.begin():
            client = await find_by_key_id(session, key_id)
            if client is not None and keys.verify(key, client.key_digest) and not client.disabled:
                now = utcnow()
                if client.last_used_at is None or now - client.last_used_at > LAST_USED_RESOLUTION:
                    client.last_used_at = now  # coarse, so the hot path rarely writes
            else:
                client = None
    if client is None:
        infra.audit.record(denial(request, "unauthenticated", None, None))
        detail = "a valid client API key is required" if key else "missing bearer API key"
        raise AuthenticationFailed(detail)
    request.state.client = client
    return client


CurrentClient = Annotated[Client, Depends(current_client)]


async def require_admin(request: Request, client: CurrentClient, infra: InfraDep) -> Client:
    if client.role is not Role.ADMIN:
        infra.audit.record(denial(request, "forbidden", client, None))
        raise PermissionDenied("this route needs the admin role")
    return client


Admin = Annotated[Client, Depends(require_admin)]


def ensure_team_access(request: Request, client: Client, team: str, audit: AuditLog) -> None:
    """Refuse before looking the team up, so the answer is the same whether it exists or not."""
    if not client.may_access(team):
        audit.record(denial(request, "team-not-granted", client, team))
        raise TeamNotGranted(f"this client has no grant for team {team!r}")
