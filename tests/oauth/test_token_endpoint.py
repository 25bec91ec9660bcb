"""`POST /oauth/token` through the real app, on both backends, and through an off-the-shelf OAuth
client (Authlib) over ASGI and over a real uvicorn server."""

from __future__ import annotations

import base64
import hashlib
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jose import jwt as jose_jwt

from app.integrations.phrase.dev_idm import DevIdmMode
from app.main import create_app
from tests.conftest import Api, Env
from tests.support.servers import ServerThread

TOKEN_URL = "/oauth/token"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_KEY = "urn:tokenvend:params:oauth:token-type:client_key"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"
UNKNOWN_KEY = "tvk_0123456789abcdef_" + "A" * 43


@dataclass(frozen=True)
class Service:
    """A client service: its id, its API key, and the API token of the team's `default`."""

    id: str
    key: str
    api_token: str

    @property
    def key_id(self) -> str:
        return self.key.split("_", 2)[1]


async def new_client(api: Api, teams: list[str]) -> tuple[str, str]:
    client_id, headers = await api.client(teams)
    return client_id, headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture
async def svc(api: Api) -> Service:
    """Team `acme` with a `default` credential, and a client granted `acme`."""
    await api.team()
    api_token = await api.credential()
    client_id, key = await new_client(api, ["acme"])
    return Service(client_id, key, api_token)


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"Authorization": f"Basic {base64.b64encode(raw).decode()}"}


def exchange(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": key,
        "subject_token_type": CLIENT_KEY,
        "audience": "acme",
        **fields,
    }


async def token(
    http: httpx.AsyncClient, data: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(TOKEN_URL, data=data, headers=headers)


async def raw_token(
    http: httpx.AsyncClient, body: str | bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await http.post(
        TOKEN_URL, content=body, headers={"Content-Type": FORM, **(headers or {})}
    )


def sub_of(api_token: str) -> str:
    """The `sub` the development IdM puts in JWTs exchanged for this API token."""
    return f"dev-{hashlib.sha256(api_token.encode()).hexdigest()[:24]}"


def assert_token(r: httpx.Response, api_token: str) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["pragma"] == "no-cache"
    body: dict[str, Any] = r.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == ACCESS_TOKEN
    claims = jose_jwt.get_unverified_claims(body["access_token"])
    assert claims["sub"] == sub_of(api_token)
    assert abs(claims["exp"] - (time.time() + body["expires_in"])) <= 2
    return body


def assert_oauth_error(r: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    return body


def assert_invalid_client(r: httpx.Response, *secrets: str) -> None:
    assert_oauth_error(r, 401, "invalid_client")
    assert r.headers["www-authenticate"] == 'Basic realm="tokenvend"'
    for secret in secrets:
        assert secret not in r.text


class TestClientAuthentication:
    @pytest.mark.parametrize("subject_token_type", [CLIENT_KEY, ACCESS_TOKEN])
    async def test_token_exchange_with_the_key_as_subject_token(
        self, http: httpx.AsyncClient, svc: Service, env: Env, subject_token_type: str
    ) -> None:
        r = await token(http, exchange(svc.key, subject_token_type=subject_token_type))

        body = assert_token(r, svc.api_token)
        assert 14399 - 5 <= body["expires_in"] <= 14399
        assert env.idm.exchanges == 1

    async def test_client_credentials_with_basic(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        r = await token(
            http,
            {"grant_type": "client_credentials", "audience": "acme"},
            basic(svc.key_id, svc.key),
        )
        assert_token(r, svc.api_token)

    async def test_client_credentials_with_client_secret_post(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        r = await token(
            http,
            {
                "grant_type": "client_credentials",
                "audience": "acme",
                "client_id": svc.key_id,
                "client_secret": svc.key,
            },
        )
        assert_token(r, svc.api_token)

    async def test_token_exchange_with_basic_and_the_same_key_as_subject(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        r = await token(http, exchange(svc.key), basic(svc.key_id, svc.key))
        assert_token(r, svc.api_token)

    async def test_client_id_may_be_the_clients_id_instead_of_the_key_id(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        form = {"grant_type": "client_credentials", "audience": "acme"}
        assert_token(await token(http, form, basic(svc.id, svc.key)), svc.api_token)
        assert_token(await token(http, form, basic(svc.id.upper(), svc.key)), svc.api_token)

    async def test_basic_credentials_are_form_urlencoded_first_per_rfc_6749(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        def encoded(value: str) -> str:
            return "".join(f"%{b:02X}" for b in value.encode())

        r = await token(
            http,
            {"grant_type": "client_credentials", "audience": "acme"},
            basic(encoded(svc.key_id), encoded(svc.key)),
        )
        assert_token(r, svc.api_token)

    async def test_basic_together_with_client_secret_post_is_invalid_request(
        self, http: httpx.AsyncClient, svc: Service, env: Env
    ) -> None:
        r = await token(
            http,
            {
                "grant_type": "client_credentials",
                "audience": "acme",
                "client_id": svc.key_id,
                "client_secret": svc.key,
            },
            basic(svc.key_id, svc.key),
        )
        assert_oauth_error(r, 400, "invalid_request")
        assert env.idm.requests == 0

    async def test_another_clients_key_as_subject_token_is_invalid_request(
        self, http: httpx.AsyncClient, api: Api, svc: Service, env: Env
    ) -> None:
        _, other_key = await new_client(api, ["acme"])

        r = await token(http, exchange(other_key), basic(svc.key_id, svc.key))

        body = assert_oauth_error(r, 400, "invalid_request")
        assert "subject_token" in body["error_description"]
        assert other_key not in r.text
        assert env.idm.requests == 0

    @pytest.mark.parametrize("method", ["basic", "post", "subject_token", "basic_subject_mismatch"])
    async def test_an_unknown_key_gets_invalid_client_by_every_method(
        self, http: httpx.AsyncClient, svc: Service, env: Env, method: str
    ) -> None:
        cc = {"grant_type": "client_credentials", "audience": "acme"}
        match method:
            case "basic":
                r = await token(http, cc, basic(UNKNOWN_KEY.split("_")[1], UNKNOWN_KEY))
            case "post":
                r = await token(
                    http,
                    {**cc, "client_id": UNKNOWN_KEY.split("_")[1], "client_secret": UNKNOWN_KEY},
                )
            case "subject_token":
                r = await token(http, exchange(UNKNOWN_KEY))
            case _:
                r = await token(http, exchange(svc.key), basic(svc.key_id, UNKNOWN_KEY))

        assert_invalid_client(r, UNKNOWN_KEY)
        assert env.idm.requests == 0

    async def test_a_wrong_secret_for_a_real_key_id_is_invalid_client(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        forged = f"tvk_{svc.key_id}_" + "B" * 43
        r = await token(
            http,
            {"grant_type": "client_credentials", "audience": "acme"},
            basic(svc.key_id, forged),
        )
        assert_invalid_client(r, forged)

    @pytest.mark.parametrize(
        "authorization",
        [
            "Basic",
            "Basic !!!not-base64!!!",
            f"Basic {base64.b64encode(b'no-colon-here').decode()}",
            f"Basic {base64.b64encode(bytes([0xFF, 0x3A, 0xFE])).decode()}",
            "Bearer {key}",
        ],
    )
    async def test_a_malformed_or_non_basic_authorization_header_is_invalid_client(
        self, http: httpx.AsyncClient, svc: Service, authorization: str
    ) -> None:
        r = await token(
            http,
            {"grant_type": "client_credentials", "audience": "acme"},
            {"Authorization": authorization.format(key=svc.key)},
        )
        assert_invalid_client(r, svc.key)

    async def test_a_client_id_that_does_not_name_the_keys_client_is_invalid_client(
        self, http: httpx.AsyncClient, api: Api, svc: Service
    ) -> None:
        other_id, other_key = await new_client(api, ["acme"])
        cc = {"grant_type": "client_credentials", "audience": "acme"}
        for client_id in ["someone", other_key.split("_")[1], other_id]:
            assert_invalid_client(await token(http, cc, basic(client_id, svc.key)), svc.key)
            assert_invalid_client(
                await token(http, {**cc, "client_id": client_id, "client_secret": svc.key}),
                svc.key,
            )
        # A lone client_id next to the subject token is checked the same way.
        assert_invalid_client(await token(http, exchange(svc.key, client_id=other_id)), svc.key)
        assert_token(await token(http, exchange(svc.key, client_id=svc.key_id)), svc.api_token)

    async def test_disabled_client_is_invalid_client_until_re_enabled(
        self, http: httpx.AsyncClient, api: Api, svc: Service
    ) -> None:
        form = exchange(svc.key)
        assert (await token(http, form)).status_code == 200

        await http.patch(f"/v1/clients/{svc.id}", json={"disabled": True}, headers=api.admin)
        assert_invalid_client(await token(http, form), svc.key)
        assert_invalid_client(await token(http, form, basic(svc.key_id, svc.key)), svc.key)

        await http.patch(f"/v1/clients/{svc.id}", json={"disabled": False}, headers=api.admin)
        assert (await token(http, form)).status_code == 200

    async def test_client_credentials_without_client_authentication_is_invalid_client(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        r = await token(http, {"grant_type": "client_credentials", "audience": "acme"})
        assert_invalid_client(r)
        # The subject token is no client authentication outside token exchange.
        r = await token(http, exchange(svc.key, grant_type="client_credentials"))
        assert_invalid_client(r, svc.key)

    async def test_client_secret_without_client_id_is_invalid_request(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        r = await token(
            http, {"grant_type": "client_credentials", "audience": "acme", "client_secret": svc.key}
        )
        assert_oauth_error(r, 400, "invalid_request")
        assert svc.key not in r.text


class TestRateLimit:
    async def test_the_clients_rate_limit_applies_with_429_and_retry_after(
        self, env: Env, svc: Service
    ) -> None:
        settings = env.settings.model_copy(
            update={"rate_limit_per_second": 1.0, "rate_limit_burst": 1}
        )
        limited = create_app(settings)
        async with limited.router.lifespan_context(limited):
            transport = httpx.ASGITransport(app=limited)
            async with httpx.AsyncClient(transport=transport, base_url="http://limited") as h:
                first = await token(h, exchange(svc.key))
                second = await token(
                    h,
                    {"grant_type": "client_credentials", "audience": "acme"},
                    basic(svc.key_id, svc.key),
                )

        assert_token(first, svc.api_token)
        assert_oauth_error(second, 429, "temporarily_unavailable")
        assert int(second.headers["retry-after"]) >= 1


class TestTarget:
    async def test_no_grant_is_the_same_invalid_target_for_existing_and_missing_teams(
        self, http: httpx.AsyncClient, api: Api, svc: Service, env: Env
    ) -> None:
        await api.team("other")
        await api.credential("other")

        existing = await token(http, exchange(svc.key, audience="other"))
        missing = await token(http, exchange(svc.key, audience="nonexistent"))

        assert_oauth_error(existing, 400, "invalid_target")
        assert existing.json() == missing.json()
        assert "other" not in existing.text
        assert env.idm.requests == 0

    @pytest.mark.parametrize(
        ("fields", "credential"),
        [
            ({"audience": "acme"}, "default"),
            ({"audience": None, "resource": "https://tokenvend.example/teams/acme"}, "default"),
            ({"audience": None, "resource": "https://tokenvend.example/teams/acme/"}, "default"),
            ({"audience": None, "resource": "urn:tokenvend:team:acme"}, "default"),
            ({"audience": None, "resource": "urn:tokenvend:team:acme:second"}, "second"),
            ({"audience": "urn:tokenvend:team:acme:second"}, "second"),
            ({"audience": "acme", "credential": "second"}, "second"),
            ({"audience": "acme", "resource": "urn:tokenvend:team:acme:second"}, "second"),
            (
                {"audience": ["acme", "acme"], "resource": "https://x.example/teams/acme"},
                "default",
            ),
            (
                {"resource": "urn:tokenvend:team:acme:second", "credential": "second"},
                "second",
            ),
        ],
    )
    async def test_audience_resource_and_credential_forms_select_the_credential(
        self,
        http: httpx.AsyncClient,
        api: Api,
        svc: Service,
        fields: dict[str, Any],
        credential: str,
    ) -> None:
        second_token = await api.credential(name="second")
        form = {k: v for k, v in exchange(svc.key, **fields).items() if v is not None}

        r = await token(http, form)

        assert_token(r, svc.api_token if credential == "default" else second_token)

    @pytest.mark.parametrize(
        "fields",
        [
            {"audience": None},
            {"audience": ""},
            {"audience": "ACME"},
            {"audience": "acme/x"},
            {"audience": "urn:tokenvend:team:"},
            {"audience": "urn:tokenvend:team:acme:default:extra"},
            {"audience": None, "resource": "https://tokenvend.example/teams/acme#frag"},
            {"audience": None, "resource": "ftp://tokenvend.example/acme"},
            {"audience": None, "resource": "https:///acme"},
            {"audience": None, "resource": "https://tokenvend.example/"},
            {"audience": ["acme", "other"]},
            {"audience": "acme", "resource": "urn:tokenvend:team:other"},
            {"audience": "acme", "resource": "urn:tokenvend:team:acme:second", "credential": "x"},
            {"audience": "acme", "credential": "Not A Slug"},
        ],
    )
    async def test_missing_malformed_or_ambiguous_targets_are_invalid_target(
        self, http: httpx.AsyncClient, svc: Service, env: Env, fields: dict[str, Any]
    ) -> None:
        form = {k: v for k, v in exchange(svc.key, **fields).items() if v is not None}

        r = await token(http, form)

        body = assert_oauth_error(r, 400, "invalid_target")
        assert "other" not in body["error_description"]
        assert env.idm.requests == 0

    async def test_unknown_team_or_credential_for_a_granted_client_is_invalid_target(
        self, http: httpx.AsyncClient, api: Api, svc: Service, env: Env
    ) -> None:
        _, everything = await new_client(api, ["*"])

        assert_oauth_error(
            await token(http, exchange(everything, audience="nonexistent")), 400, "invalid_target"
        )
        assert_oauth_error(
            await token(http, exchange(everything, credential="nonexistent")), 400, "invalid_target"
        )
        assert env.idm.requests == 0


class TestParameters:
    async def test_min_ttl_longer_than_the_cached_jwt_forces_a_new_exchange(
        self, http: httpx.AsyncClient, svc: Service, env: Env
    ) -> None:
        env.idm.set_mode(DevIdmMode(expires_in=900))
        short = await token(http, exchange(svc.key, min_ttl="0"))
        assert assert_token(short, svc.api_token)["expires_in"] <= 900

        env.idm.set_mode(DevIdmMode())
        longer = await token(http, exchange(svc.key, min_ttl="1800"))

        assert assert_token(longer, svc.api_token)["expires_in"] > 1800
        assert env.idm.exchanges == 2
        again = await token(http, exchange(svc.key, min_ttl="1800"))
        assert again.json()["access_token"] == longer.json()["access_token"]
        assert env.idm.exchanges == 2

    @pytest.mark.parametrize("min_ttl", ["-1", "3601", "abc", "1.5", "99999", "٣"])
    async def test_bad_min_ttl_is_invalid_request(
        self, http: httpx.AsyncClient, svc: Service, env: Env, min_ttl: str
    ) -> None:
        assert_oauth_error(
            await token(http, exchange(svc.key, min_ttl=min_ttl)), 400, "invalid_request"
        )
        assert env.idm.requests == 0

    @pytest.mark.parametrize(
        "grant_type", ["password", "authorization_code", "refresh_token", "urn:x:unknown"]
    )
    async def test_unsupported_grant_types(
        self, http: httpx.AsyncClient, svc: Service, grant_type: str
    ) -> None:
        r = await token(http, exchange(svc.key, grant_type=grant_type))
        body = assert_oauth_error(r, 400, "unsupported_grant_type")
        assert grant_type not in body["error_description"]

    @pytest.mark.parametrize(
        ("fields", "error"),
        [
            ({"grant_type": None}, "invalid_request"),
            ({"grant_type": ""}, "invalid_request"),
            ({"subject_token": None}, "invalid_request"),
            ({"subject_token_type": None}, "invalid_request"),
            (
                {"subject_token_type": "urn:ietf:params:oauth:token-type:id_token"},
                "invalid_request",
            ),
            ({"actor_token": "tvk_x", "actor_token_type": CLIENT_KEY}, "invalid_request"),
            (
                {"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
                "invalid_request",
            ),
            ({"scope": "read"}, "invalid_scope"),
        ],
    )
    async def test_missing_or_unsupported_fields(
        self, http: httpx.AsyncClient, svc: Service, env: Env, fields: dict[str, Any], error: str
    ) -> None:
        form = {k: v for k, v in exchange(svc.key, **fields).items() if v is not None}

        r = await token(http, form)

        assert_oauth_error(r, 400, error)
        assert svc.key not in r.text
        assert env.idm.requests == 0

    async def test_optional_fields_tokenvend_accepts(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        for requested in [ACCESS_TOKEN, "urn:ietf:params:oauth:token-type:jwt"]:
            r = await token(http, exchange(svc.key, requested_token_type=requested, scope=""))
            assert_token(r, svc.api_token)
        # RFC 6749 3.2: unrecognized parameters are ignored.
        assert_token(await token(http, exchange(svc.key, state="xyz")), svc.api_token)

    @pytest.mark.parametrize(
        ("body", "names"),
        [
            ("grant_type=client_credentials&grant_type=client_credentials", "grant_type"),
            ("subject_token={key}&subject_token={key}", "subject_token"),
            ("min_ttl=1&min_ttl=2", "min_ttl"),
            ("x-custom=1&x-custom=2", None),
        ],
    )
    async def test_repeated_parameters_are_invalid_request(
        self, http: httpx.AsyncClient, svc: Service, env: Env, body: str, names: str | None
    ) -> None:
        base = f"grant_type={TOKEN_EXCHANGE}&subject_token_type={CLIENT_KEY}&audience=acme"
        fields = body.format(key=svc.key)
        if "subject_token=" not in fields:
            fields += f"&subject_token={svc.key}"
        if "grant_type=" in fields:
            base = base.replace(f"grant_type={TOKEN_EXCHANGE}&", "")

        r = await raw_token(http, f"{base}&{fields}")

        description = assert_oauth_error(r, 400, "invalid_request")["error_description"]
        assert "repeated" in description
        if names is None:
            assert "x-custom" not in description
        else:
            assert description.startswith(names)
        assert svc.key not in r.text
        assert env.idm.requests == 0

    async def test_an_oversized_body_is_refused_unread(
        self, http: httpx.AsyncClient, svc: Service, env: Env
    ) -> None:
        form = str(httpx.QueryParams(exchange(svc.key))) + "&pad="
        at_the_cap = form + "x" * (8192 - len(form))
        body = at_the_cap + "x"

        announced = await raw_token(http, body)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000].encode()

        streamed = await http.post(TOKEN_URL, content=chunks(), headers={"Content-Type": FORM})

        for r in (announced, streamed):
            assert_oauth_error(r, 413, "invalid_request")
        assert "content-length" not in streamed.request.headers
        assert env.idm.requests == 0
        assert len(at_the_cap) == 8192
        assert_token(await raw_token(http, at_the_cap), svc.api_token)

    @pytest.mark.parametrize(
        ("content_type", "body"),
        [
            ("application/json", b'{"grant_type": "client_credentials"}'),
            ("multipart/form-data; boundary=x", b"--x--"),
            (None, b"grant_type=client_credentials"),
            (FORM, b"grant_type=%FF%FE"),
            (FORM, b"grant_type=\xff"),
            (FORM, b""),
        ],
    )
    async def test_a_body_that_is_not_a_utf8_form_is_invalid_request(
        self, http: httpx.AsyncClient, svc: Service, content_type: str | None, body: bytes
    ) -> None:
        headers = {} if content_type is None else {"Content-Type": content_type}
        r = await http.post(TOKEN_URL, content=body, headers=headers)
        assert_oauth_error(r, 400, "invalid_request")

    async def test_a_form_with_a_charset_parameter_is_accepted(
        self, http: httpx.AsyncClient, svc: Service
    ) -> None:
        body = str(httpx.QueryParams(exchange(svc.key)))
        r = await raw_token(http, body, {"Content-Type": f"{FORM}; charset=UTF-8"})
        assert_token(r, svc.api_token)

    async def test_only_post_is_allowed(self, http: httpx.AsyncClient) -> None:
        r = await http.get(TOKEN_URL)
        assert r.status_code == 405


class TestUpstreamOutcomes:
    async def test_a_rejected_credential_is_invalid_grant_and_not_retried_upstream(
        self, http: httpx.AsyncClient, api: Api, env: Env
    ) -> None:
        await api.team()
        await api.credential(api_token="not-a-known-phrase-token")
        _, key = await new_client(api, ["acme"])

        for _ in range(3):
            body = assert_oauth_error(await token(http, exchange(key)), 400, "invalid_grant")
            assert "credential-rejected" in body["error_description"]
            assert "not-a-known-phrase-token" not in body["error_description"]
        assert env.idm.requests == 1

    async def test_a_disabled_credential_is_invalid_grant(
        self, http: httpx.AsyncClient, api: Api, svc: Service, env: Env
    ) -> None:
        r = await http.patch(
            "/v1/teams/acme/credentials/default", json={"status": "disabled"}, headers=api.admin
        )
        assert r.status_code == 200, r.text

        body = assert_oauth_error(await token(http, exchange(svc.key)), 400, "invalid_grant")
        assert "credential-disabled" in body["error_description"]
        assert env.idm.requests == 0

    @pytest.mark.parametrize(
        "mode", [DevIdmMode(fail_status=503), DevIdmMode(fail_status=429, retry_after=7)]
    )
    async def test_an_unavailable_upstream_is_503_temporarily_unavailable_with_retry_after(
        self, http: httpx.AsyncClient, svc: Service, env: Env, mode: DevIdmMode
    ) -> None:
        env.idm.set_mode(mode)

        r = await token(http, exchange(svc.key))

        assert_oauth_error(r, 503, "temporarily_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        env.idm.set_mode(DevIdmMode())
        assert_token(await token(http, exchange(svc.key)), svc.api_token)

    async def test_a_garbage_upstream_answer_is_502_server_error(
        self, http: httpx.AsyncClient, svc: Service, env: Env
    ) -> None:
        env.idm.set_mode(DevIdmMode(garbage="html"))
        assert_oauth_error(await token(http, exchange(svc.key)), 502, "server_error")

    async def test_the_oauth_endpoint_shares_the_cache_with_the_rest_route(
        self, http: httpx.AsyncClient, svc: Service, env: Env
    ) -> None:
        rest = await http.get(
            "/v1/teams/acme/token", headers={"Authorization": f"Bearer {svc.key}"}
        )
        oauth = await token(http, exchange(svc.key))

        assert assert_token(oauth, svc.api_token)["access_token"] == rest.json()["access_token"]
        assert env.idm.exchanges == 1


class TestAudit:
    async def test_vends_and_denials_are_audited_with_via_oauth(
        self, http: httpx.AsyncClient, api: Api, svc: Service
    ) -> None:
        jwt = (await token(http, exchange(svc.key), {"X-Request-ID": "oauth-0"})).json()
        await token(
            http,
            {"grant_type": "client_credentials", "audience": "acme"},
            {**basic(svc.key_id, svc.key), "X-Request-ID": "oauth-1"},
        )
        await token(http, exchange(svc.key, credential="nope"), {"X-Request-ID": "oauth-2"})
        await token(http, exchange(svc.key, audience="other"), {"X-Request-ID": "oauth-3"})
        await token(http, exchange(UNKNOWN_KEY), {"X-Request-ID": "oauth-4"})

        r = await http.get("/v1/audit-events", params={"limit": 100}, headers=api.admin)

        events = {e["request_id"]: e for e in r.json()["items"] if e["request_id"]}
        for rid, cache in [("oauth-0", "miss"), ("oauth-1", "hit")]:
            event = events[rid]
            assert event["action"] == "token.vend"
            assert (event["outcome"], event["cache"]) == ("ok", cache)
            assert event["actor_client_id"] == svc.id
            assert (event["team"], event["credential"]) == ("acme", "default")
            assert event["details"] == {"via": "oauth"}
            assert len(event["jwt_sha256"]) == 16
        failed = events["oauth-2"]
        assert (failed["action"], failed["outcome"]) == ("token.vend", "credential-not-found")
        assert failed["details"] == {"via": "oauth"}
        denied = events["oauth-3"]
        assert (denied["action"], denied["outcome"]) == ("auth.denied", "team-not-granted")
        assert (denied["team"], denied["actor_client_id"]) == ("other", svc.id)
        assert denied["details"]["route"] == TOKEN_URL
        unauthenticated = events["oauth-4"]
        assert (unauthenticated["action"], unauthenticated["outcome"]) == (
            "auth.denied",
            "unauthenticated",
        )
        assert jwt["access_token"] not in r.text
        assert svc.key not in r.text

    async def test_no_token_is_vended_while_the_audit_trail_cannot_be_written(
        self,
        http: httpx.AsyncClient,
        app: FastAPI,
        svc: Service,
        env: Env,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setattr(app.state.infra.audit, "accepting", lambda: False)

        r = await token(http, exchange(svc.key))

        assert_oauth_error(r, 503, "temporarily_unavailable")
        assert int(r.headers["retry-after"]) >= 1
        assert env.idm.requests == 0


class TestOpenApi:
    async def test_the_operation_is_documented(self, http: httpx.AsyncClient) -> None:
        spec = (await http.get("/openapi.json")).json()

        op = spec["paths"][TOKEN_URL]["post"]

        assert op["operationId"] == "oauthToken"
        assert op["tags"] == ["oauth"]
        assert op["summary"]
        assert op["description"]
        form = op["requestBody"]["content"][FORM]["schema"]
        assert form["properties"]["grant_type"]["enum"] == [TOKEN_EXCHANGE, "client_credentials"]
        assert {"subject_token", "audience", "resource", "client_secret"} <= set(form["properties"])
        assert set(op["responses"]) >= {"200", "400", "401", "413", "429", "503"}
        media = op["requestBody"]["content"][FORM]
        assert set(media["examples"]) == {"token-exchange", "client-credentials"}
        error_ref = op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error_ref == op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
        assert op["security"] == [{"OAuthClientBasic": []}, {}]
        assert spec["components"]["securitySchemes"]["OAuthClientBasic"]["scheme"] == "basic"


# --- an off-the-shelf OAuth client ----------------------------------------------------------------


@pytest.fixture
def authlib_client() -> Any:
    """Authlib's AsyncOAuth2Client class. Authlib 1.9 warns at import that it prefers `httpx2`;
    the warning is about Authlib's own future, not about this code."""
    with warnings.catch_warnings():
        # authlib.deprecate installs an "always" filter of its own when imported: import it inside
        # this scope first, so that filter is undone on exit and the "ignore" below wins.
        from authlib.deprecate import AuthlibDeprecationWarning

        warnings.simplefilter("ignore", AuthlibDeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client
    return AsyncOAuth2Client


GRANTS: dict[str, dict[str, str]] = {
    "token-exchange": {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token_type": CLIENT_KEY,
        "audience": "acme",
    },
    "client-credentials": {"grant_type": "client_credentials", "audience": "acme"},
}


class TestAuthlib:
    @pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
    @pytest.mark.parametrize("grant", sorted(GRANTS))
    async def test_authlib_fetches_a_jwt_over_asgi(
        self,
        app: FastAPI,
        svc: Service,
        authlib_client: Any,
        auth_method: str,
        grant: str,
    ) -> None:
        extra = {"subject_token": svc.key} if grant == "token-exchange" else {}
        async with authlib_client(
            client_id=svc.key_id,
            client_secret=svc.key,
            token_endpoint_auth_method=auth_method,
            transport=httpx.ASGITransport(app=app),
        ) as client:
            fetched = await client.fetch_token(
                f"http://tokenvend.test{TOKEN_URL}", **GRANTS[grant], **extra
            )

        assert fetched["token_type"] == "Bearer"
        assert 14399 - 5 <= fetched["expires_in"] <= 14399
        assert fetched["expires_at"] >= int(time.time()) + 14399 - 5
        claims = jose_jwt.get_unverified_claims(fetched["access_token"])
        assert claims["sub"] == sub_of(svc.api_token)

    async def test_authlib_surfaces_oauth_errors(
        self, app: FastAPI, svc: Service, authlib_client: Any
    ) -> None:
        from authlib.integrations.base_client import OAuthError

        async with authlib_client(
            client_id=svc.key_id,
            client_secret=svc.key,
            transport=httpx.ASGITransport(app=app),
        ) as client:
            with pytest.raises(OAuthError) as raised:
                await client.fetch_token(
                    f"http://tokenvend.test{TOKEN_URL}",
                    grant_type="client_credentials",
                    audience="nonexistent",
                )
        assert raised.value.error == "invalid_target"

    async def test_authlib_against_a_real_uvicorn_server(
        self, env: Env, svc: Service, authlib_client: Any
    ) -> None:
        with ServerThread(create_app(env.settings)) as server:
            async with authlib_client(
                client_id=svc.key_id,
                client_secret=svc.key,
                token_endpoint_auth_method="client_secret_basic",
            ) as client:
                fetched = await client.fetch_token(
                    f"{server.url}{TOKEN_URL}",
                    grant_type=TOKEN_EXCHANGE,
                    subject_token=svc.key,
                    subject_token_type=CLIENT_KEY,
                    resource="urn:tokenvend:team:acme:default",
                )
        claims = jose_jwt.get_unverified_claims(fetched["access_token"])
        assert claims["sub"] == sub_of(svc.api_token)
        assert fetched["expires_in"] > 0
