"""Encryption key rotation, online: `tokenvend keys generate` makes a key, the service runs with the
keyring `new,old`, and `tokenvend keys rotate` (the real CLI, a subprocess, on PostgreSQL)
re-encrypts every API token under `new` in batches while vends and evictions keep running against
the service. Zero failed requests, zero rows left on `old`, a second run finds nothing to do, and
JWTs cached in Redis under the old key stay readable while it is in the keyring.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import func, select, text

from app.auth.keys import issue_key
from app.core.config import Settings
from app.core.crypto import Keyring
from app.core.db import create_engine, create_sessionmaker
from app.credentials.models import Credential
from app.credentials.schemas import CredentialCreate
from app.credentials.service import create_credential
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm
from app.teams.schemas import TeamCreate
from app.teams.service import create_team
from app.tokens.cache import CachedJwt, RedisCache
from tests.conftest import make_settings, truncate
from tests.fixtures.services import REDIS_URL, redis_prefix
from tests.security import serving
from tests.support.processes import clean_environ, tokenvend_argv

CREDENTIALS = 250
BATCH = 50
PRESEALED = 10  # credentials whose JWT a replica on the old keyring already cached in Redis
REPORT = re.compile(
    r"scanned=(\d+) reencrypted=(\d+) changed_meanwhile=(\d+) failed=(\d+) primary_key=(\S+)"
)


def slug(i: int) -> str:
    return f"rot-{i:03d}"


async def cli(tmp_path: Path, *args: str, keys: str, database_url: str) -> str:
    """Run `tokenvend ...` as a subprocess without blocking the event loop (the load goes on)."""
    env = clean_environ() | {
        "TOKENVEND_DATABASE_URL": database_url,
        "TOKENVEND_ENCRYPTION_KEYS": keys,
    }
    process = await asyncio.create_subprocess_exec(
        *tokenvend_argv(*args),
        cwd=tmp_path,  # no .env of the checkout
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


def counts(output: str) -> dict[str, int | str]:
    match = REPORT.search(output)
    assert match, output
    scanned, reencrypted, changed, failed, primary = match.groups()
    return {
        "scanned": int(scanned),
        "reencrypted": int(reencrypted),
        "changed_meanwhile": int(changed),
        "failed": int(failed),
        "primary_key": primary,
    }


@pytest.fixture
def prefix() -> Iterator[str]:
    with redis_prefix("rotation") as prefix:
        yield prefix


@pytest.fixture
def database_url(postgres_url: str) -> str:
    asyncio.run(truncate(postgres_url))
    return postgres_url


@pytest.fixture
def idm_url(dev_idm_server: tuple[DevIdm, str], idm: DevIdm) -> str:
    return dev_idm_server[1]


def settings_for(database_url: str, keys: str, prefix: str, idm_url: str, admin: str) -> Settings:
    return make_settings(
        database_url=database_url,
        encryption_keys=keys,
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        phrase_eu_url=idm_url,
        phrase_us_url=idm_url,
        bootstrap_admin_key=admin,
    )


async def seed(settings: Settings) -> dict[str, uuid.UUID]:
    """CREDENTIALS teams with a `default` credential each, sealed under the settings' keyring."""
    engine = create_engine(settings)
    ids = {}
    try:
        async with create_sessionmaker(engine)() as session, session.begin():
            for i in range(CREDENTIALS):
                team = await create_team(session, TeamCreate(slug=slug(i)))
                await session.flush()
                data = CredentialCreate(
                    region="eu", api_token=f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"
                )  # type: ignore[arg-type]
                cred = await create_credential(session, team, data, settings.keyring)
                ids[slug(i)] = cred.id
    finally:
        await engine.dispose()
    return ids


async def keys_in_use(app: FastAPI) -> dict[str, int]:
    async with app.state.infra.sessionmaker() as session:
        rows = await session.execute(
            select(Credential.api_token_key_id, func.count()).group_by(Credential.api_token_key_id)
        )
        return dict(rows.all())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class TestKeyRotation:
    async def test_rotating_under_load_fails_no_request_and_leaves_no_row_on_the_old_key(
        self, tmp_path: Path, database_url: str, prefix: str, idm_url: str, idm: DevIdm
    ) -> None:
        generated = await cli(
            tmp_path, "keys", "generate", "--kid", "new", keys="", database_url=""
        )
        new_spec = generated.splitlines()[-1]
        assert new_spec.startswith("new:")
        assert Keyring.parse(new_spec).key_ids == ["new"]  # a well-formed 32-byte key
        old_spec = Keyring.generate_spec("old")
        keyring = f"{new_spec},{old_spec}"
        admin = issue_key().key.get_secret_value()
        ids = await seed(settings_for(database_url, old_spec, prefix, idm_url, admin))

        # A replica still on the old keyring cached JWTs for some credentials.
        redis = Redis.from_url(REDIS_URL)
        old_replica = RedisCache(redis, Keyring.parse(f"{old_spec},{new_spec}"), prefix)
        presealed = {}
        for i in range(PRESEALED):
            jwt = CachedJwt(f"jwt-cached-by-the-old-keyring-{i}", time.time() + 3600)
            assert await old_replica.put(ids[slug(i)], 1, jwt, ttl=3000)
            presealed[slug(i)] = jwt.access_token
        await redis.aclose()

        settings = settings_for(database_url, keyring, prefix, idm_url, admin)
        env = {"keys": keyring, "database_url": database_url}
        async with serving(settings) as (app, http):
            admin_headers = bearer(admin)
            r = await http.post(
                "/v1/clients", json={"name": "load", "teams": ["*"]}, headers=admin_headers
            )
            client = bearer(r.json()["api_key"])
            for team, token in presealed.items():
                r = await http.get(f"/v1/teams/{team}/token", headers=client)
                assert r.status_code == 200, r.text
                assert (r.json()["cache"], r.json()["access_token"]) == ("hit", token)
            assert await keys_in_use(app) == {"old": CREDENTIALS}

            load = Load(http, client, admin_headers)
            watcher = asyncio.create_task(load.watch_rows(app))
            workers = [asyncio.create_task(load.worker(n)) for n in range(Load.WORKERS)]
            await asyncio.sleep(0.3)  # under load before the rotation starts...
            output = await cli(tmp_path, "keys", "rotate", "--batch-size", str(BATCH), **env)
            during = sum(load.statuses.values())
            await asyncio.sleep(0.3)  # ...and after it ends
            load.stop.set()
            await asyncio.gather(*workers, watcher)

            first = counts(output)
            async with app.state.infra.engine.connect() as conn:
                left = await conn.scalar(
                    text("SELECT count(*) FROM credentials WHERE api_token_key_id <> 'new'")
                )
            assert await keys_in_use(app) == {"new": CREDENTIALS}

        assert load.failures == [], load.failures[:10]
        assert set(load.statuses) == {"vend 200", "evict 200"}
        assert during > 50, "the rotation did not run under load"
        assert first == {
            "scanned": CREDENTIALS,
            "reencrypted": CREDENTIALS,
            "changed_meanwhile": 0,
            "failed": 0,
            "primary_key": "new",
        }
        assert left == 0

        # A second run finds nothing to do; meanwhile a service with only the new key (the old
        # one can go now) reads rows from every batch.
        later = settings_for(database_url, new_spec, f"{prefix}after:", idm_url, admin)
        async with serving(later) as (_, http):

            async def vend(team: str) -> int:
                r = await http.get(f"/v1/teams/{team}/token", headers=client)
                return r.status_code

            second_output, *statuses = await asyncio.gather(
                cli(tmp_path, "keys", "rotate", "--batch-size", str(BATCH), **env),
                *(vend(slug(i)) for i in range(0, CREDENTIALS, 5)),
            )
        second = counts(second_output)
        assert (second["scanned"], second["reencrypted"], second["failed"]) == (0, 0, 0)
        assert Counter(statuses) == {200: CREDENTIALS // 5}

        print(
            f"\nkey rotation: first run: {output}\n"
            f"  second run: {second}\n"
            f"  requests during the run: {dict(load.statuses)}, failed: {len(load.failures)}\n"
            f"  rows on the old key seen while it ran: {load.old_rows_seen}\n"
            f"  rows left on the old key: {left}; vends by a service with the new key only: "
            f"{dict(Counter(statuses))}"
        )

    async def test_jwts_sealed_under_the_old_key_open_while_it_is_in_the_keyring(
        self, prefix: str
    ) -> None:
        old, new = Keyring.generate_spec("old"), Keyring.generate_spec("new")
        redis = Redis.from_url(REDIS_URL)
        try:
            old_replica = RedisCache(redis, Keyring.parse(f"{old},{new}"), prefix)
            new_replica = RedisCache(redis, Keyring.parse(f"{new},{old}"), prefix)
            old_key_gone = RedisCache(redis, Keyring.parse(new), prefix)
            cred = uuid.uuid4()
            jwt = CachedJwt("header.payload.signature", time.time() + 600)

            assert await old_replica.put(cred, 1, jwt, ttl=60)

            assert await redis.hget(old_replica.entry_key(cred, 1), "k") == b"old"
            assert await new_replica.get(cred, 1) == jwt
            # Once the key leaves the keyring the entry no longer opens: a miss, never an error.
            assert await old_key_gone.get(cred, 1) is None
        finally:
            await redis.aclose()


class Load:
    """Vends over every credential, with evictions mixed in so that vends keep re-reading rows
    (an admin change flushes the credential directory) and decrypting them, old key or new."""

    WORKERS = 8
    PAUSE = 0.005  # leaves CPU to the rotating subprocess: the load is there to interleave

    def __init__(
        self, http: httpx.AsyncClient, client: dict[str, str], admin: dict[str, str]
    ) -> None:
        self.http = http
        self.client = client
        self.admin = admin
        self.stop = asyncio.Event()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.old_rows_seen: list[int] = []

    def _note(self, what: str, r: httpx.Response) -> None:
        self.statuses[f"{what} {r.status_code}"] += 1
        if r.status_code != 200:
            self.failures.append(f"{what} {r.request.url.path}: {r.status_code} {r.text[:200]}")

    async def worker(self, n: int) -> None:
        i = n
        while not self.stop.is_set():
            team = slug((i * 37) % CREDENTIALS)
            if i % 3 == 0:
                self._note(
                    "evict", await self.http.delete(f"/v1/teams/{team}/token", headers=self.admin)
                )
            self._note("vend", await self.http.get(f"/v1/teams/{team}/token", headers=self.client))
            i += self.WORKERS
            await asyncio.sleep(self.PAUSE)

    async def watch_rows(self, app: FastAPI) -> None:
        """The number of rows still on the old key, whenever it changes: the batches at work."""
        while not self.stop.is_set():
            old = (await keys_in_use(app)).get("old", 0)
            if not self.old_rows_seen or self.old_rows_seen[-1] != old:
                self.old_rows_seen.append(old)
            await asyncio.sleep(0.01)
