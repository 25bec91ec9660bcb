"""Authentication (who is calling) and authorization (may they) as FastAPI dependencies.

Keys are checked by `app.auth.service.Authenticator`: from process memory while that is trusted,
else from the database in a short transaction of its own (the token route must not hold a pooled
connection while it waits for an exchange). Disabling, deleting or rotating a client's key flushes
every replica's memory after the commit, so it takes effect on that key's next request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.audit.service import AuditLog, AuditRecord
from app.auth.ratelimit import RateLimited
from app.auth.service import Principal
from app.core.deps import InfraDep
from app.core.errors import AuthenticationFailed, PermissionDenied
from app.core.lifespan import Infra

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ClientKey",
    bearerFormat="tvk_<key id>_<secret>",
    description="A tokenvend client API key, as printed by `tokenvend admin create-key` or "
    "returned by `POST /v1/clients`.",
)


class TeamNotGranted(PermissionDenied):
    code = "team-not-granted"
    title = "Team not granted"


def denial(
    request: Request, outcome: str, actor: Principal | None, team: str | None
) -> AuditRecord:
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


async def admit_key(infra: Infra, key: str) -> tuple[Principal | None, float]:
    """The key's principal (None: not a valid, enabled key) and the seconds its rate limit says
    to wait (0: admitted). Shared by every way a client key is presented (bearer, OAuth)."""
    principal = await infra.authenticator.authenticate(key, optimistic=True) if key else None
    if principal is None:
        return None, 0.0
    # The request's one Redis round trip: the rate limit, and whether process memory is current.
    # If it is not (an admin change, or Redis unreachable), ask the database again.
    rate = principal.rate_limit_per_second or infra.settings.rate_limit_per_second
    wait = await infra.ratelimiter.admit(principal.id, rate)
    if not infra.invalidation.trusted():
        principal = await infra.authenticator.authenticate(key)
    return principal, wait


async def client_for_key(request: Request, infra: Infra, key: str) -> Principal:
    """The caller presenting `key`, admitted by its rate limit; refuses with 401 or 429."""
    principal, wait = await admit_key(infra, key)
    if principal is None:
        infra.audit.record(denial(request, "unauthenticated", None, None))
        detail = "a valid client API key is required" if key else "missing bearer API key"
        raise AuthenticationFailed(detail)
    request.state.client = principal
    if wait > 0:
        raise RateLimited(wait)
    return principal


async def current_client(
    request: Request,
    infra: InfraDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    return await client_for_key(
        request, infra, credentials.credentials.strip() if credentials else ""
    )


CurrentClient = Annotated[Principal, Depends(current_client)]


async def require_admin(request: Request, client: CurrentClient, infra: InfraDep) -> Principal:
    if not client.is_admin:
        infra.audit.record(denial(request, "forbidden", client, None))
        raise PermissionDenied("this route needs the admin role")
    return client


Admin = Annotated[Principal, Depends(require_admin)]


def ensure_team_access(request: Request, client: Principal, team: str, audit: AuditLog) -> None:
    """Refuse before looking the team up, so the answer is the same whether it exists or not."""
    if not client.may_access(team):
        audit.record(denial(request, "team-not-granted", client, team))
        raise TeamNotGranted(f"this client has no grant for team {team!r}")
