"""Ciphertext integrity: a sealed API token moved to another row, or altered by one byte, does not
open (AES-GCM with the row's id as additional data). The vend fails cleanly, with a generic 500
`credential-unreadable` and an audit event, never with another team's JWT, and the IdM is not
asked. The same holds for JWTs sealed in Redis (the key's name is the additional data).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt as jose_jwt
from redis.asyncio import Redis
from sqlalchemy import select, update

from app.core.crypto import Keyring
from app.credentials.models import Credential
from app.credentials.rekey import reencrypt_all
from app.teams.models import Team
from tests.conftest import Api, Env
from tests.security import settled_app  # noqa: F401 - a fixture, used through pytestmark

GENERIC_DETAIL = "the stored API token cannot be decrypted"

pytestmark = pytest.mark.usefixtures("settled_app")


def subject_of(api_token: str) -> str:
    """The `sub` the development IdM puts in JWTs exchanged for this API token."""
    return f"dev-{hashlib.sha256(api_token.encode()).hexdigest()[:24]}"


async def rows(app: FastAPI) -> dict[str, Credential]:
    """The `default` credential row of each team, by team slug."""
    async with app.state.infra.sessionmaker() as session:
        result = await session.execute(
            select(Team.slug, Credential).join(Credential, Credential.team_id == Team.id)
        )
        return {slug: cred for slug, cred in result.all() if cred.name == "default"}


async def set_row(app: FastAPI, cred_id: uuid.UUID, **values: Any) -> None:
    infra = app.state.infra
    async with infra.sessionmaker() as session, session.begin():
        await session.execute(update(Credential).where(Credential.id == cred_id).values(**values))
    # As after any change to the database behind the service's back: every replica re-reads.
    await infra.invalidation.bump()


async def vend(http: httpx.AsyncClient, headers: dict[str, str], team: str) -> httpx.Response:
    return await http.get(f"/v1/teams/{team}/token", headers=headers)


def assert_unreadable(r: httpx.Response, *secrets: str) -> None:
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "credential-unreadable"
    assert body["detail"] == GENERIC_DETAIL
    assert "access_token" not in body
    for secret in secrets:
        assert secret not in r.text


@pytest.fixture
async def two_teams(api: Api) -> tuple[dict[str, str], dict[str, str]]:
    """Teams alpha and beta with their own API tokens, and a client granted both."""
    tokens = {}
    for team in ("alpha", "beta"):
        await api.team(team)
        tokens[team] = await api.credential(team)
    _, client = await api.client(["alpha", "beta"])
    return tokens, client


class TestSwappedCiphertexts:
    async def test_swapped_rows_fail_cleanly_and_never_yield_the_other_teams_jwt(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        api: Api,
        env: Env,
        two_teams: tuple[dict[str, str], dict[str, str]],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        tokens, client = two_teams
        found = await rows(app)
        alpha, beta = found["alpha"], found["beta"]
        assert alpha.api_token_key_id == beta.api_token_key_id  # same key: only the AAD differs

        await set_row(app, alpha.id, api_token_ciphertext=beta.api_token_ciphertext)
        await set_row(app, beta.id, api_token_ciphertext=alpha.api_token_ciphertext)
        with caplog.at_level(logging.INFO):
            answers = {team: await vend(http, client, team) for team in ("alpha", "beta")}

        for team, other in (("alpha", "beta"), ("beta", "alpha")):
            # Neither token, nor even the name of the team whose ciphertext the row now holds.
            assert_unreadable(answers[team], tokens["alpha"], tokens["beta"], other)
        assert env.idm.requests == 0, "a swapped row reached the IdM"
        assert tokens["alpha"] not in caplog.text
        assert tokens["beta"] not in caplog.text
        assert "credential.decrypt.failed" in caplog.text

        audit = await http.get(
            "/v1/audit-events", params={"action": "token.vend"}, headers=api.admin
        )
        outcomes = {(e["team"], e["outcome"], e["jwt_sha256"]) for e in audit.json()["items"]}
        assert outcomes == {
            ("alpha", "credential-unreadable", None),
            ("beta", "credential-unreadable", None),
        }

        # Put back, each row serves its own team's JWT again.
        await set_row(app, alpha.id, api_token_ciphertext=alpha.api_token_ciphertext)
        await set_row(app, beta.id, api_token_ciphertext=beta.api_token_ciphertext)
        for team in ("alpha", "beta"):
            r = await vend(http, client, team)
            assert r.status_code == 200, r.text
            claims = jose_jwt.get_unverified_claims(r.json()["access_token"])
            assert claims["sub"] == subject_of(tokens[team])

    @pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
    async def test_one_flipped_byte_fails_cleanly(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        env: Env,
        two_teams: tuple[dict[str, str], dict[str, str]],
        where: str,
    ) -> None:
        tokens, client = two_teams
        alpha = (await rows(app))["alpha"]
        blob = bytearray(alpha.api_token_ciphertext)
        index = {"nonce": 0, "ciphertext": 12 + 3, "tag": len(blob) - 1}[where]
        blob[index] ^= 0x01

        await set_row(app, alpha.id, api_token_ciphertext=bytes(blob))

        assert_unreadable(await vend(http, client, "alpha"), tokens["alpha"], tokens["beta"])
        assert env.idm.requests == 0
        beta = await vend(http, client, "beta")  # the other team is unaffected
        assert beta.status_code == 200
        claims = jose_jwt.get_unverified_claims(beta.json()["access_token"])
        assert claims["sub"] == subject_of(tokens["beta"])

    async def test_a_key_id_not_in_the_keyring_fails_cleanly(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        env: Env,
        two_teams: tuple[dict[str, str], dict[str, str]],
    ) -> None:
        tokens, client = two_teams
        alpha = (await rows(app))["alpha"]
        await set_row(app, alpha.id, api_token_key_id="retired")

        assert_unreadable(await vend(http, client, "alpha"), tokens["alpha"])
        assert env.idm.requests == 0

    async def test_the_rekey_counts_an_unreadable_row_and_leaves_it_alone(
        self, app: FastAPI, two_teams: tuple[dict[str, str], dict[str, str]], env: Env
    ) -> None:
        alpha = (await rows(app))["alpha"]
        tampered = alpha.api_token_ciphertext[:-1] + bytes([alpha.api_token_ciphertext[-1] ^ 1])
        await set_row(app, alpha.id, api_token_ciphertext=tampered)
        keyring = Keyring.parse(
            f"{Keyring.generate_spec('next')},{env.settings.encryption_keys.get_secret_value()}"  # type: ignore[union-attr]
        )

        report = await reencrypt_all(app.state.infra.sessionmaker, keyring, batch_size=1)

        assert (report.scanned, report.reencrypted, report.failed) == (2, 1, 1)
        after = await rows(app)
        assert after["alpha"].api_token_ciphertext == tampered
        assert after["alpha"].api_token_key_id == alpha.api_token_key_id
        assert after["beta"].api_token_key_id == "next"


class TestMovedCachedJwt:
    # JWTs are sealed in Redis only; the memory backend keeps them in process.
    @pytest.mark.parametrize("backend", ["postgres-redis"])
    async def test_a_jwt_entry_copied_to_another_credential_does_not_open(
        self,
        app: FastAPI,
        http: httpx.AsyncClient,
        env: Env,
        two_teams: tuple[dict[str, str], dict[str, str]],
    ) -> None:
        tokens, client = two_teams
        beta_jwt = (await vend(http, client, "beta")).json()["access_token"]
        found = await rows(app)
        shared = app.state.infra.cache.shared
        source = shared.entry_key(found["beta"].id, found["beta"].version)
        target = shared.entry_key(found["alpha"].id, found["alpha"].version)
        redis = Redis.from_url(str(env.settings.redis_url.get_secret_value()))  # type: ignore[union-attr]
        try:
            assert await redis.copy(source, target, replace=True)
            requests = env.idm.requests

            r = await vend(http, client, "alpha")

            assert r.status_code == 200, r.text
            assert r.json()["access_token"] != beta_jwt
            assert r.json()["cache"] == "miss"  # the copied entry did not open
            claims = jose_jwt.get_unverified_claims(r.json()["access_token"])
            assert claims["sub"] == subject_of(tokens["alpha"])
            assert env.idm.requests == requests + 1
        finally:
            await redis.aclose()
