"""The development IdM's token endpoint contract, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from jose import jwt
from jose.exceptions import JWTError

from app.integrations.phrase.client import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_API_TOKEN,
)
from app.integrations.phrase.dev_idm import HUGE_BODY_BYTES, ISSUER, DevIdm

TOKEN = "phrdev_team-acme-0123456789"


@pytest.fixture
async def http(idm_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=idm_url, timeout=5) as client:
        yield client


def form(subject_token: str | None = TOKEN, **fields: str) -> dict[str, str]:
    base = {"grant_type": GRANT_TYPE_TOKEN_EXCHANGE}
    if subject_token is not None:
        base["subject_token"] = subject_token
    return {**base, **fields}


async def exchange(http: httpx.AsyncClient, data: Any = None) -> httpx.Response:
    return await http.post("/oauth/token", data=form() if data is None else data)


async def verified_claims(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    jwks = (await http.get("/.well-known/jwks.json")).json()
    return jwt.decode(token, jwks, algorithms=["RS256"], issuer=ISSUER)


def assert_oauth_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["error"] == error
    assert isinstance(body["error_description"], str)
    assert body["error_description"]


class TestTokenEndpoint:
    async def test_exchange_returns_a_bearer_token_response(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        response = await exchange(
            http,
            form(
                subject_token_type=TOKEN_TYPE_API_TOKEN,
                requested_token_type=TOKEN_TYPE_ACCESS_TOKEN,
            ),
        )

        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["pragma"] == "no-cache"
        body = response.json()
        assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
        assert body["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == 14399
        assert idm.requests == 1
        assert idm.exchanges == 1

    async def test_jwt_is_signed_by_the_published_key_and_carries_the_claims(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        before = int(time.time())
        body = (await exchange(http)).json()

        claims = await verified_claims(http, body["access_token"])

        assert jwt.get_unverified_header(body["access_token"])["kid"] == idm.kid
        assert claims["iss"] == ISSUER
        assert before <= claims["iat"] <= time.time()
        assert claims["exp"] - claims["iat"] == body["expires_in"]
        assert len(claims["jti"]) == 32
        assert claims["sub"].startswith("dev-")
        assert TOKEN not in claims["sub"]

    async def test_sub_is_stable_per_api_token_and_jti_unique(
        self, http: httpx.AsyncClient
    ) -> None:
        first, second = [(await exchange(http)).json()["access_token"] for _ in range(2)]
        other = (await exchange(http, form(f"{TOKEN}-other"))).json()["access_token"]

        a, b, c = (jwt.get_unverified_claims(t) for t in (first, second, other))
        assert a["sub"] == b["sub"] != c["sub"]
        assert a["jti"] != b["jti"]

    async def test_a_jwt_from_another_idm_does_not_verify(self, http: httpx.AsyncClient) -> None:
        _, response = DevIdm().answer(
            "application/x-www-form-urlencoded", "", urlencode(form()).encode(), redirect_url=""
        )
        foreign = json.loads(bytes(response.body))["access_token"]

        with pytest.raises(JWTError):
            await verified_claims(http, foreign)

    async def test_missing_grant_type_is_invalid_request(self, http: httpx.AsyncClient) -> None:
        response = await exchange(http, {"subject_token": TOKEN})
        assert_oauth_error(response, 400, "invalid_request")

    @pytest.mark.parametrize(
        "grant_type", ["client_credentials", "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    )
    async def test_other_grant_types_are_unsupported(
        self, http: httpx.AsyncClient, idm: DevIdm, grant_type: str
    ) -> None:
        response = await exchange(http, {"grant_type": grant_type, "subject_token": TOKEN})
        assert_oauth_error(response, 400, "unsupported_grant_type")
        assert idm.exchanges == 0

    @pytest.mark.parametrize("subject_token", [None, ""])
    async def test_missing_subject_token_is_invalid_request(
        self, http: httpx.AsyncClient, subject_token: str | None
    ) -> None:
        response = await exchange(http, form(subject_token))
        assert_oauth_error(response, 400, "invalid_request")

    @pytest.mark.parametrize(
        "fields",
        [
            {"subject_token_type": "urn:ietf:params:oauth:token-type:jwt"},
            {"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        ],
    )
    async def test_unsupported_token_types_are_invalid_request(
        self, http: httpx.AsyncClient, idm: DevIdm, fields: dict[str, str]
    ) -> None:
        assert_oauth_error(await exchange(http, form(**fields)), 400, "invalid_request")
        assert idm.exchanges == 0

    async def test_repeated_parameter_is_invalid_request(self, http: httpx.AsyncClient) -> None:
        body = httpx.QueryParams([*form().items(), ("subject_token", "phrdev_second")])
        response = await http.post(
            "/oauth/token",
            content=str(body),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert_oauth_error(response, 400, "invalid_request")

    async def test_json_body_is_invalid_request(self, http: httpx.AsyncClient) -> None:
        response = await http.post("/oauth/token", json=form())
        assert_oauth_error(response, 400, "invalid_request")

    async def test_unknown_token_is_invalid_grant(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        response = await exchange(http, form("not-a-dev-token"))
        assert_oauth_error(response, 400, "invalid_grant")
        assert (idm.requests, idm.exchanges) == (1, 0)

    async def test_revoked_token_is_invalid_grant(self, http: httpx.AsyncClient) -> None:
        assert (await exchange(http)).status_code == 200

        revoked = await http.post("/_dev/api-tokens/revoke", json={"api_token": TOKEN})

        assert revoked.status_code == 204
        assert_oauth_error(await exchange(http), 400, "invalid_grant")

    async def test_registered_token_without_prefix_is_accepted(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        token = "a-real-looking-phrase-token"
        assert_oauth_error(await exchange(http, form(token)), 400, "invalid_grant")

        registered = await http.post("/_dev/api-tokens", json={"api_token": token})

        assert registered.status_code == 204
        assert (await exchange(http, form(token))).status_code == 200
        idm.revoke(token)
        assert_oauth_error(await exchange(http, form(token)), 400, "invalid_grant")
        idm.register(token)
        assert (await exchange(http, form(token))).status_code == 200

    async def test_api_tokens_are_kept_only_as_digests(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.register("registered-secret")
        idm.revoke("phrdev_revoked-secret")
        await exchange(http)

        state = repr(vars(idm)) + (await http.get("/_dev/state")).text
        for secret in ("registered-secret", "phrdev_revoked-secret", TOKEN):
            assert secret not in state


class TestFailureModes:
    async def test_delay_holds_the_answer(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(delay_ms=300)
        started = time.monotonic()

        response = await exchange(http)

        assert time.monotonic() - started >= 0.3
        assert response.status_code == 200

    async def test_fail_status_recovers_after_fail_times(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.set_mode(fail_status=503, fail_times=2)

        statuses = [(await exchange(http)).status_code for _ in range(3)]

        assert statuses == [503, 503, 200]
        assert (idm.requests, idm.exchanges) == (3, 1)
        assert idm.mode.fail_status is None

    async def test_fail_status_without_fail_times_lasts_until_changed(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.set_mode(fail_status=500)
        responses = [await exchange(http) for _ in range(3)]
        assert [r.status_code for r in responses] == [500, 500, 500]
        assert_oauth_error(responses[0], 500, "server_error")

        idm.set_mode()

        assert (await exchange(http)).status_code == 200

    async def test_429_carries_retry_after(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(fail_status=429, retry_after=7)

        response = await exchange(http)

        assert_oauth_error(response, 429, "temporarily_unavailable")
        assert response.headers["retry-after"] == "7"
        assert idm.exchanges == 0

    async def test_expires_in_can_be_shortened(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(expires_in=5)

        body = (await exchange(http)).json()

        claims = await verified_claims(http, body["access_token"])
        assert body["expires_in"] == 5
        assert claims["exp"] - claims["iat"] == 5

    async def test_html_garbage(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(garbage="html")
        response = await exchange(http)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert response.text.startswith("<!doctype html>")

    async def test_huge_garbage(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(garbage="huge")
        response = await exchange(http)
        assert response.status_code == 200
        assert len(response.content) > HUGE_BODY_BYTES
        assert response.json()["token_type"] == "Bearer"  # valid JSON: only a size cap stops it

    async def test_missing_fields_garbage(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(garbage="missing-fields")
        body = (await exchange(http)).json()
        assert "access_token" not in body
        assert body["token_type"] == "Bearer"

    async def test_bad_expires_garbage(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        idm.set_mode(garbage="bad-expires")
        body = (await exchange(http)).json()
        assert body["expires_in"] == -5
        assert body["access_token"]

    async def test_redirect_garbage_points_to_a_counting_target(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.set_mode(garbage="redirect")
        response = await exchange(http)
        assert response.status_code == 302
        assert idm.redirect_target_hits == 0

        await http.get(response.headers["location"])

        assert idm.redirect_target_hits == 1

    async def test_garbage_honours_fail_times_and_issues_nothing(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.set_mode(garbage="missing-fields", fail_times=1)
        assert "access_token" not in (await exchange(http)).json()
        assert idm.exchanges == 0
        assert "access_token" in (await exchange(http)).json()
        assert idm.exchanges == 1

    async def test_mode_is_driven_over_http(self, http: httpx.AsyncClient, idm: DevIdm) -> None:
        put = await http.put("/_dev/mode", json={"fail_status": 502, "retry_after": 3})
        assert put.status_code == 200
        assert put.json()["fail_status"] == 502
        assert idm.mode.fail_status == 502
        assert (await exchange(http)).status_code == 502

        state = (await http.get("/_dev/state")).json()
        assert state["requests"] == 1
        assert state["exchanges"] == 0
        assert state["mode"]["retry_after"] == 3

        assert (await http.post("/_dev/reset")).status_code == 204
        state = (await http.get("/_dev/state")).json()
        assert (state["requests"], state["mode"]["fail_status"]) == (0, None)

    @pytest.mark.parametrize(
        "mode", [{"fail_status": 200}, {"garbage": "teapot"}, {"delay_ms": -1}, {"x": 1}]
    )
    async def test_bad_modes_are_refused(
        self, http: httpx.AsyncClient, idm: DevIdm, mode: dict[str, Any]
    ) -> None:
        assert (await http.put("/_dev/mode", json=mode)).status_code == 422
        assert idm.mode.fail_status is None
        assert idm.mode.garbage is None


class TestCounters:
    async def test_counters_are_exact_under_concurrent_requests(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.set_mode(delay_ms=50, fail_status=503, fail_times=10)
        tokens = [TOKEN if n % 2 else "unknown" for n in range(60)]

        responses = await asyncio.gather(*(exchange(http, form(t)) for t in tokens))

        statuses = [r.status_code for r in responses]
        assert statuses.count(503) == 10
        assert idm.requests == 60
        assert idm.exchanges == statuses.count(200)
        assert statuses.count(200) + statuses.count(400) == 50

    async def test_reset_keeps_registrations_unless_asked(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        idm.register("kept-token")
        idm.set_mode(expires_in=9)
        await exchange(http, form("kept-token"))

        idm.reset()
        assert (idm.requests, idm.exchanges, idm.mode.expires_in) == (0, 0, 14399)
        assert idm.last_request is None
        assert (await exchange(http, form("kept-token"))).status_code == 200

        assert (await http.post("/_dev/reset", params={"tokens": "true"})).status_code == 204
        assert_oauth_error(await exchange(http, form("kept-token")), 400, "invalid_grant")

    async def test_last_request_records_the_form_without_the_secret(
        self, http: httpx.AsyncClient, idm: DevIdm
    ) -> None:
        await exchange(http)

        recorded = idm.last_request
        assert recorded is not None
        assert recorded.fields["grant_type"] == GRANT_TYPE_TOKEN_EXCHANGE
        assert recorded.fields["subject_token"] != TOKEN
        assert len(recorded.fields["subject_token"]) == 64
        assert recorded.content_type == "application/x-www-form-urlencoded"
