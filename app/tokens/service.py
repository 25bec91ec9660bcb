"""Vending for a route: the audit, the metrics and the broker, shared by the REST token route and
the OAuth token endpoint so that the two cannot drift apart."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import Request

from app.audit.dependencies import request_record
from app.core.errors import TokenvendError
from app.core.lifespan import Infra
from app.metrics.registry import VENDS
from app.tokens.broker import CredentialSnapshot, Vended

# The children of a few label values, looked up once rather than on every vend.
_vends = functools.cache(VENDS.labels)


async def vend_for(
    request: Request,
    infra: Infra,
    team: str,
    credential: str,
    min_ttl: int | None,
    *,
    rejected_sha256: str | None = None,
    details: dict[str, Any] | None = None,
) -> tuple[CredentialSnapshot, Vended]:
    """Vend, after the caller checked the grant. Every outcome is audited; the audit must be
    writable first (fail closed)."""
    infra.audit.ensure_accepting()
    wanted = infra.settings.default_min_ttl_seconds if min_ttl is None else min_ttl
    record = request_record(request, "token.vend", team=team, credential=credential)
    record.details = dict(details or {})
    if rejected_sha256 is not None:
        record.details["rejected_sha256"] = rejected_sha256[:16]
    record.details = record.details or None
    try:
        cred = await infra.directory.find(team, credential)
        vended = await infra.broker.vend(cred, wanted, rejected_sha256=rejected_sha256)
    except TokenvendError as exc:
        _vends("error").inc()
        record.outcome = exc.code
        infra.audit.record(record)
        raise
    _vends("stale" if infra.cache.degraded and vended.cache == "hit" else vended.cache).inc()
    record.cache, record.jwt_sha256 = vended.cache, vended.jwt.fingerprint
    infra.audit.record(record)
    return cred, vended
