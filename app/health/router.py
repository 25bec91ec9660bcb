from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.core.deps import InfraDep
from app.core.problems import problem_response, responses

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness",
    responses=responses(503),
)
async def readyz(request: Request, infra: InfraDep) -> Response:
    """Ready when the database answers within a second. Without Redis the service still serves
    (in-process cache and single flight per process): `degraded`, still 200."""
    checks: dict[str, str] = {}

    async def database() -> None:
        async with infra.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    for name, probe in (("database", database), ("cache", infra.cache.ping)):
        try:
            await asyncio.wait_for(probe(), timeout=1.0)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is the type only
            checks[name] = f"failed: {type(exc).__name__}"
    if checks["database"] != "ok":
        return problem_response(
            request,
            status=503,
            code="not-ready",
            title="Not ready",
            detail="unavailable: database",
            extra={"checks": checks},
            headers={"Retry-After": "1"},
        )
    degraded = checks["cache"] != "ok" or infra.cache.degraded
    body = {
        "status": "degraded" if degraded else "ok",
        "checks": checks,
        "cache": infra.cache.name,
    }
    return JSONResponse(body)
