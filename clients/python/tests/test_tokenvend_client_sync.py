"""TokenVendClient against a real tokenvend (SQLite, in-process cache, development IdM)."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TEAM, Tokenvend
from tokenvend_client import (
    CredentialRejected,
    Forbidden,
    NotFound,
    TokenVendClient,
    TokenVendError,
    Unauthorized,
    Unavailable,
    VendedToken,
)


@pytest.fixture
def tv(tokenvend: Tokenvend, http: httpx.Client) -> TokenVendClient:
    return TokenVendClient(tokenvend.url, tokenvend.client_key, http=http)


def assert_secret_free(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text
    assert "eyJ" not in text


class TestToken:
    def test_returns_a_jwt_and_serves_the_second_call_from_the_local_cache(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        first = tv.token(TEAM)
        second = tv.token(TEAM)

        assert second is first
        assert first.access_token.count(".") == 2
        assert (first.team, first.credential, first.region, first.cache) == (
            TEAM,
            "default",
            "eu",
            "miss",
        )
        assert first.expires_at.tzinfo is not None
        expected_expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=first.expires_in)
        assert abs((first.expires_at - expected_expiry).total_seconds()) < 5
        assert tokenvend.idm.exchanges == 1
        [request] = tokenvend.token_requests()
        assert request.url.path == f"/v1/teams/{TEAM}/token"
        assert dict(request.url.params) == {"credential": "default"}
        assert request.headers["authorization"] == f"Bearer {tokenvend.client_key}"

    def test_min_ttl_beyond_the_cached_life_asks_tokenvend_again(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.set_mode(expires_in=600)
        short = tv.token(TEAM)
        assert 540 < short.expires_in <= 600
        tokenvend.idm.set_mode(expires_in=14399)

        assert tv.token(TEAM, min_ttl=500) is short  # 600 s left is enough for 500
        assert len(tokenvend.token_requests()) == 1

        longer = tv.token(TEAM, min_ttl=1200)

        assert longer.access_token != short.access_token
        assert longer.expires_in > 1200
        requests = tokenvend.token_requests()
        assert len(requests) == 2
        assert requests[1].url.params["min_ttl"] == "1200"
        assert tokenvend.idm.exchanges == 2
        assert tv.token(TEAM, min_ttl=1200) is longer

    def test_min_ttl_below_the_leeway_asks_for_the_leeway(
        self, tokenvend: Tokenvend, http: httpx.Client
    ) -> None:
        tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http, leeway=90)
        tv.token(TEAM, min_ttl=10)
        assert tokenvend.token_requests()[0].url.params["min_ttl"] == "90"

    def test_a_jwt_within_the_leeway_of_expiry_is_not_reused(
        self, tokenvend: Tokenvend, http: httpx.Client
    ) -> None:
        tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http, leeway=20_000)
        tv.token(TEAM)
        tv.token(TEAM)
        assert len(tokenvend.token_requests()) == 2
        assert tokenvend.idm.exchanges == 1  # tokenvend served the second one from its cache

    def test_invalidate_makes_the_next_call_ask_tokenvend(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        first = tv.token(TEAM)
        tv.invalidate(TEAM)
        again = tv.token(TEAM)

        assert again is not first
        assert again.access_token == first.access_token
        assert again.cache == "hit"
        assert len(tokenvend.token_requests()) == 2

    def test_credentials_are_cached_separately(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        r = tokenvend.admin(
            "POST",
            f"/v1/teams/{TEAM}/credentials",
            json={"name": "tms", "region": "us", "api_token": "phrdev_tms_api_token_0001"},
        )
        assert r.status_code == 201, r.text

        default, tms = tv.token(TEAM), tv.token(TEAM, credential="tms")

        assert (default.credential, tms.credential, tms.region) == ("default", "tms", "us")
        assert default.access_token != tms.access_token
        assert tv.token(TEAM, credential="tms") is tms
        assert len(tokenvend.token_requests()) == 2


class TestSingleFlight:
    def test_20_threads_on_a_cold_team_cause_one_request(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.set_mode(delay_ms=200)  # a slow exchange, so that every thread piles up
        start = threading.Barrier(20)

        def ask(_: int) -> VendedToken:
            start.wait()
            return tv.token(TEAM)

        with ThreadPoolExecutor(20) as pool:
            tokens = list(pool.map(ask, range(20)))

        assert len({t.access_token for t in tokens}) == 1
        assert len(tokenvend.token_requests()) == 1
        assert tokenvend.idm.exchanges == 1

    def test_threads_waiting_on_a_failed_request_share_its_error(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.set_mode(delay_ms=200, fail_status=503)
        start = threading.Barrier(20)

        def ask(_: int) -> BaseException | None:
            start.wait()
            try:
                tv.token(TEAM)
            except TokenVendError as exc:
                return exc
            return None

        with ThreadPoolExecutor(20) as pool:
            errors = list(pool.map(ask, range(20)))

        assert all(isinstance(e, Unavailable) and e.status == 503 for e in errors)
        assert len({id(e) for e in errors}) == 20  # each thread raises its own copy
        assert len(tokenvend.token_requests()) == 1

        tokenvend.idm.set_mode()  # recovered: the next caller asks again
        assert tv.token(TEAM).cache == "miss"
        assert len(tokenvend.token_requests()) == 2


class TestErrors:
    def test_ungranted_team_is_forbidden(self, tv: TokenVendClient, tokenvend: Tokenvend) -> None:
        tokenvend.add_team("other")
        with pytest.raises(Forbidden) as caught:
            tv.token("other")
        err = caught.value
        assert (err.status, err.code) == (403, "team-not-granted")
        assert err.request_id
        assert err.detail
        assert_secret_free(str(err) + repr(err), tokenvend.client_key)

    def test_unknown_credential_is_not_found(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        with pytest.raises(NotFound) as caught:
            tv.token(TEAM, credential="nope")
        assert (caught.value.status, caught.value.code) == (404, "credential-not-found")

    def test_unknown_team_is_not_found_for_an_admin(
        self, tokenvend: Tokenvend, http: httpx.Client
    ) -> None:
        tv = TokenVendClient(tokenvend.url, tokenvend.admin_key, http=http)
        with pytest.raises(NotFound) as caught:
            tv.token("ghost")
        assert caught.value.code == "team-not-found"
        assert_secret_free(str(caught.value) + repr(caught.value), tokenvend.admin_key)

    def test_bad_key_is_unauthorized_and_never_shown(
        self, tokenvend: Tokenvend, http: httpx.Client
    ) -> None:
        key = tokenvend.client_key[:-4] + "AAAA"
        tv = TokenVendClient(tokenvend.url, key, http=http)
        with pytest.raises(Unauthorized) as caught:
            tv.token(TEAM)
        err = caught.value
        assert (err.status, err.code) == (401, "unauthenticated")
        assert_secret_free(str(err) + repr(err) + repr(tv), key, tokenvend.client_key)

    def test_refused_api_token_is_credential_rejected(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.revoke(tokenvend.api_token)
        with pytest.raises(CredentialRejected) as caught:
            tv.token(TEAM)
        assert (caught.value.status, caught.value.code) == (424, "credential-rejected")

    def test_upstream_outage_is_unavailable_with_retry_after(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.set_mode(fail_status=503, retry_after=7)
        with pytest.raises(Unavailable) as caught:
            tv.token(TEAM)
        err = caught.value
        assert (err.status, err.code) == (503, "upstream-unavailable")
        assert err.retry_after is not None
        assert err.retry_after >= 1
        assert "retry_after=" in repr(err)

    @pytest.mark.parametrize("tokenvend_settings", [{"upstream_timeout_seconds": 0.3}])
    def test_upstream_timeout_is_unavailable(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        tokenvend.idm.set_mode(delay_ms=1500)
        with pytest.raises(Unavailable) as caught:
            tv.token(TEAM)
        assert (caught.value.status, caught.value.code) == (504, "upstream-timeout")

    def test_unreachable_tokenvend_is_unavailable_without_status(self) -> None:
        key = "tvk_abc_" + "s" * 43
        with (
            TokenVendClient("http://127.0.0.1:1", key, timeout=1) as tv,
            pytest.raises(Unavailable) as caught,
        ):
            tv.token(TEAM)
        err = caught.value
        assert (err.status, err.code) == (None, "unreachable")
        assert_secret_free(str(err) + repr(err), key)

    def test_reprs_hide_the_key_and_the_jwt(
        self, tv: TokenVendClient, tokenvend: Tokenvend
    ) -> None:
        token = tv.token(TEAM)
        assert_secret_free(repr(token) + repr(tv), token.access_token, tokenvend.client_key)
        assert tokenvend.url in repr(tv)


def test_owned_http_client_is_closed_with_the_client(tokenvend: Tokenvend) -> None:
    with TokenVendClient(tokenvend.url + "/", tokenvend.client_key) as tv:
        assert tv.token(TEAM).team == TEAM
    with pytest.raises(RuntimeError):
        tv.token(TEAM, min_ttl=20_000)  # would need a request, on a closed httpx client
