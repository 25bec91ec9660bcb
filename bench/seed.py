"""Seeding: the few things a benchmark needs through the admin API, and the many (10,000 teams)
straight into the database, sealed exactly as `app.credentials.service.create_credential` seals,
with, when asked, their JWTs straight into the shared cache through tokenvend's `RedisCache`.

Rows inserted behind tokenvend's back are new rows, so no in-process cache can hold a stale view of
them: the first vend of each reads the database like any cold credential.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import time
import uuid
from dataclasses import dataclass

import httpx
from redis.asyncio import Redis
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.config import Region
from app.core.crypto import Keyring
from app.core.db import utcnow
from app.credentials.models import Credential, CredentialStatus, api_token_aad
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, ISSUER
from app.teams.models import Team
from app.tokens.cache import CachedJwt, RedisCache

CHUNK = 1000
PARALLEL = 50  # Redis commands in flight while storing JWTs


@dataclass(frozen=True, slots=True)
class SeededClient:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class AdminApi:
    def __init__(self, http: httpx.AsyncClient, admin_key: str) -> None:
        self._http = http
        self._headers = {"Authorization": f"Bearer {admin_key}"}

    async def team_with_credential(self, slug: str) -> None:
        r = await self._http.post("/v1/teams", json={"slug": slug}, headers=self._headers)
        r.raise_for_status()
        r = await self._http.post(
            f"/v1/teams/{slug}/credentials",
            json={"region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"},
            headers=self._headers,
        )
        r.raise_for_status()

    async def client(self, name: str, teams: list[str]) -> SeededClient:
        r = await self._http.post(
            "/v1/clients",
            json={"name": name, "role": "client", "teams": teams},
            headers=self._headers,
        )
        r.raise_for_status()
        body = r.json()
        return SeededClient(body["client"]["id"], body["api_key"])


async def insert_teams(
    database_url: str, keyring: Keyring, slugs: list[str]
) -> dict[str, uuid.UUID]:
    """One team with one `default` credential (region eu, a token the dev IdM accepts) per slug;
    the credential ids by slug."""
    engine = create_async_engine(database_url)
    ids: dict[str, uuid.UUID] = {}
    try:
        for start in range(0, len(slugs), CHUNK):
            teams, credentials = [], []
            now = utcnow()
            for slug in slugs[start : start + CHUNK]:
                team_id, cred_id = uuid.uuid4(), uuid.uuid4()
                api_token = f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"
                sealed = keyring.seal(api_token.encode(), api_token_aad(cred_id))
                teams.append(
                    {
                        "id": team_id,
                        "slug": slug,
                        "name": slug,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                credentials.append(
                    {
                        "id": cred_id,
                        "team_id": team_id,
                        "name": "default",
                        "region": Region.EU,
                        "product": None,
                        "api_token_ciphertext": sealed.blob,
                        "api_token_key_id": sealed.key_id,
                        "api_token_hint": api_token[-4:],
                        "status": CredentialStatus.ACTIVE,
                        "version": 1,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                ids[slug] = cred_id
            async with engine.begin() as conn:
                await conn.execute(insert(Team), teams)
                await conn.execute(insert(Credential), credentials)
    finally:
        await engine.dispose()
    return ids


def jwt_shaped(expires_at: float, now: float) -> str:
    """A token of the dev IdM's shape and size (RS256 header, the same claims, a 2048-bit
    signature's length). tokenvend treats JWTs as opaque apart from `exp`, so no signature is
    needed, and minting 10,000 of these costs nothing next to 10,000 RSA signatures."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = {"alg": "RS256", "kid": secrets.token_hex(8), "typ": "JWT"}
    claims = {
        "iss": ISSUER,
        "sub": f"dev-{secrets.token_hex(12)}",
        "iat": int(now),
        "exp": int(expires_at),
        "jti": uuid.uuid4().hex,
    }
    return ".".join(
        [
            b64(json.dumps(header, separators=(",", ":")).encode()),
            b64(json.dumps(claims, separators=(",", ":")).encode()),
            b64(os.urandom(256)),
        ]
    )


async def cache_jwts(
    redis_url: str,
    prefix: str,
    keyring: Keyring,
    cred_ids: list[uuid.UUID],
    *,
    lifetime: float = 14_399,
    margin: float = 60,
    refresh_fraction: float = 0.5,
) -> None:
    """Store a JWT for each credential (version 1) in the shared cache, through tokenvend's own
    `RedisCache`, exactly as an exchange would: sealed entry, expiry index, refresh schedule (at
    `refresh_fraction` of the lifetime, jittered like the broker does) and the vended mark."""
    redis = Redis.from_url(redis_url, max_connections=PARALLEL)
    cache = RedisCache(redis, keyring, prefix)
    now = time.time()

    async def one(cred_id: uuid.UUID) -> None:
        expires_at = now + lifetime
        await cache.put(
            cred_id,
            1,
            CachedJwt(jwt_shaped(expires_at, now), expires_at),
            expires_at - margin - now,
        )
        due = now + lifetime * refresh_fraction * random.uniform(0.9, 1.1)
        await cache.schedule_refresh(cred_id, 1, due)

    try:
        for start in range(0, len(cred_ids), PARALLEL):
            await asyncio.gather(*(one(c) for c in cred_ids[start : start + PARALLEL]))
        await cache.mark_vended(cred_ids, now)
    finally:
        await redis.aclose()
