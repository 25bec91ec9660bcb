"""PhraseIdmClient against real HTTP servers: the development IdM, and a stub for the oddities the
development IdM does not produce (plain 401s, foreign error codes, trickling bodies)."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from jose import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from app.core.config import Region
from app.core.errors import UpstreamError
from app.integrations.phrase.client import (
    GRANT_TYPE_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_API_TOKEN,
    CredentialRejected,
    ExchangedToken,
    PhraseIdmClient,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    build_http_client,
    parse_retry_after,
)
from app.integrations.phrase.dev_idm import DevIdm
from tests.support.servers import ServerThread

TOKEN = "phrdev_canary-api-token-7f3a9c"
UNKNOWN_TOKEN = "canary-unknown-api-token-51be"
CANARY_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJjYW5hcnkiOnRydWV9.c2lnbmF0dXJlLWNhbmFyeQ"


def secret_free(exc: BaseException, *secrets: str) -> bool:
    """No secret in what a log line or an error body could show of the exception."""
    text = f"{exc} {exc!r} {vars(exc)!r} {exc.args!r}"
    # Every JWT starts with the base64url of '{"', so this also catches JWTs the test never saw.
    return not any(s in text for s in (*secrets, "eyJ"))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with build_http_client(connect_timeout=1, timeout=2) as client:
        yield client


@pytest.fixture
def client(http: httpx.AsyncClient, idm_url: str) -> PhraseIdmClient:
    # A trailing slash, as settings may well carry one.
    return PhraseIdmClient(http, {Region.EU: f"{idm_url}/"})


class TestExchange:
    async def test_returns_the_exchanged_token(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        before = time.time()

        token = await client.exchange(Region.EU, TOKEN)

        assert before <= token.requested_at <= time.time()
        assert token.expires_in == 14399
        assert token.token_type == "Bearer"
        assert token.issued_token_type == TOKEN_TYPE_ACCESS_TOKEN
        claims = jwt.get_unverified_claims(token.access_token)
        assert claims["exp"] - claims["iat"] == 14399
        assert int(token.requested_at) <= claims["iat"]
        assert (idm.requests, idm.exchanges) == (1, 1)

    async def test_sends_the_token_exchange_form(
        self, client: PhraseIdmClient, idm: DevIdm
    ) -> None:
        await client.exchange(Region.EU, TOKEN)

        recorded = idm.last_request
        assert recorded is not None
        assert recorded.fields == {
            "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
            "subject_token": hashlib.sha256(TOKEN.encode()).hexdigest(),
            "subject_token_type": TOKEN_TYPE_API_TOKEN,
            "requested_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        }
        assert recorded.content_type == "application/x-www-form-urlencoded"
        assert recorded.accept == "application/json"

    async def test_follows_the_lifetime_the_idm_sets(
        self, client: PhraseIdmClient, idm: DevIdm
    ) -> None:
        idm.set_mode(expires_in=30)
        assert (await client.exchange(Region.EU, TOKEN)).expires_in == 30

    async def test_repr_hides_the_access_token(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        token = await client.exchange(Region.EU, TOKEN)

        assert token.access_token not in repr(token)
        assert token.access_token not in str(token)
        assert "expires_in=14399" in repr(token)


class TestRejected:
    async def test_unknown_token_is_rejected_with_invalid_grant(
        self, client: PhraseIdmClient, idm: DevIdm
    ) -> None:
        with pytest.raises(CredentialRejected) as caught:
            await client.exchange(Region.EU, UNKNOWN_TOKEN)

        assert caught.value.upstream_error == "invalid_grant"
        assert caught.value.status == 400
        assert caught.value.code == "credential-rejected"
        assert isinstance(caught.value, UpstreamError)
        assert secret_free(caught.value, UNKNOWN_TOKEN)
        assert (idm.requests, idm.exchanges) == (1, 0)

    async def test_revoked_token_is_rejected(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        await client.exchange(Region.EU, TOKEN)
        idm.revoke(TOKEN)

        with pytest.raises(CredentialRejected):
            await client.exchange(Region.EU, TOKEN)

    def test_upstream_error_is_limited_to_the_allow_list(self) -> None:
        assert (
            CredentialRejected(upstream_error="invalid_client").upstream_error == "invalid_client"
        )
        assert CredentialRejected(upstream_error="<b>evil</b>").upstream_error == "unknown"


class TestUnavailable:
    @pytest.mark.parametrize("status", [500, 502, 503])
    async def test_5xx_is_unavailable_and_not_retried(
        self, client: PhraseIdmClient, idm: DevIdm, status: int
    ) -> None:
        idm.set_mode(fail_status=status)

        with pytest.raises(UpstreamUnavailable) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert type(caught.value) is UpstreamUnavailable
        assert caught.value.status == status
        assert caught.value.retry_after is None
        assert caught.value.code == "upstream-unavailable"
        assert idm.requests == 1

    async def test_429_carries_retry_after(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        idm.set_mode(fail_status=429, retry_after=7)

        with pytest.raises(UpstreamUnavailable) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert caught.value.status == 429
        assert caught.value.retry_after == 7.0

    async def test_retry_after_is_capped(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        idm.set_mode(fail_status=503, retry_after=3600)

        with pytest.raises(UpstreamUnavailable) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert caught.value.retry_after == 60.0

    async def test_recovers_once_the_idm_does(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        idm.set_mode(fail_status=503, fail_times=1)

        with pytest.raises(UpstreamUnavailable):
            await client.exchange(Region.EU, TOKEN)
        token = await client.exchange(Region.EU, TOKEN)

        assert token.expires_in == 14399
        assert (idm.requests, idm.exchanges) == (2, 1)

    async def test_slow_idm_times_out(self, idm_url: str, idm: DevIdm) -> None:
        idm.set_mode(delay_ms=1000)
        async with build_http_client(connect_timeout=0.3, timeout=0.3) as http:
            client = PhraseIdmClient(http, {Region.EU: idm_url})
            started = time.monotonic()

            with pytest.raises(UpstreamTimeout) as caught:
                await client.exchange(Region.EU, TOKEN)

        assert time.monotonic() - started < 1
        assert isinstance(caught.value, UpstreamUnavailable)
        assert caught.value.code == "upstream-timeout"
        assert idm.requests == 1

    async def test_closed_port_is_unavailable(self, http: httpx.AsyncClient) -> None:
        with socket.socket() as sock:  # a port that was free a moment ago and has no listener
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        client = PhraseIdmClient(http, {Region.EU: f"http://127.0.0.1:{port}"})

        with pytest.raises(UpstreamUnavailable) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert type(caught.value) is UpstreamUnavailable
        assert caught.value.status is None
        assert secret_free(caught.value, TOKEN)


class TestBadResponse:
    @pytest.mark.parametrize("garbage", ["html", "missing-fields", "bad-expires"])
    async def test_garbage_is_a_bad_response(
        self, client: PhraseIdmClient, idm: DevIdm, garbage: str
    ) -> None:
        idm.set_mode(garbage=garbage)

        with pytest.raises(UpstreamBadResponse) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert caught.value.code == "upstream-bad-response"
        assert caught.value.status == 200
        assert secret_free(caught.value, TOKEN)
        assert idm.requests == 1

    async def test_redirect_is_not_followed(self, client: PhraseIdmClient, idm: DevIdm) -> None:
        idm.set_mode(garbage="redirect")

        with pytest.raises(UpstreamBadResponse) as caught:
            await client.exchange(Region.EU, TOKEN)

        assert caught.value.status == 302
        assert idm.redirect_target_hits == 0
        assert idm.requests == 1

    async def test_huge_body_is_cut_off_at_the_cap(self, idm_url: str, idm: DevIdm) -> None:
        idm.set_mode(garbage="huge")
        transport = CountingTransport()
        async with httpx.AsyncClient(transport=transport, timeout=2) as http:
            client = PhraseIdmClient(http, {Region.EU: idm_url}, max_response_bytes=65536)

            with pytest.raises(UpstreamBadResponse) as caught:
                await client.exchange(Region.EU, TOKEN)

        assert "65536 bytes" in str(caught.value)
        # Reading stops within one network read past the cap, far short of the >1 MiB body.
        assert 65536 < transport.bytes_read <= 2 * 65536 + 1024


@dataclass
class StubReply:
    status: int = 200
    chunks: list[bytes] = field(default_factory=lambda: [b""])
    headers: dict[str, str] = field(default_factory=dict)
    chunk_delay: float = 0.0


class StubUpstream:
    """An upstream that answers whatever the test says; counts the requests it saw."""

    def __init__(self) -> None:
        self.reply = StubReply()
        self.hits = 0
        self.app = Starlette(routes=[Route("/{path:path}", self._answer, methods=["GET", "POST"])])

    def set_json(self, status: int, body: Any, **headers: str) -> None:
        self.reply = StubReply(status, [json.dumps(body).encode()], {**headers})

    async def _answer(self, request: Request) -> Response:
        self.hits += 1
        reply = self.reply

        async def body() -> AsyncIterator[bytes]:
            for chunk in reply.chunks:
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
                yield chunk

        return StreamingResponse(body(), status_code=reply.status, headers=reply.headers)


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[StubUpstream, str]]:
    stub = StubUpstream()
    with ServerThread(stub.app) as server:
        yield stub, server.url


@pytest.fixture
def stub(stub_server: tuple[StubUpstream, str]) -> StubUpstream:
    stub_server[0].reply = StubReply()
    stub_server[0].hits = 0
    return stub_server[0]


@pytest.fixture
def stub_client(http: httpx.AsyncClient, stub_server: tuple[StubUpstream, str]) -> PhraseIdmClient:
    return PhraseIdmClient(http, {Region.EU: stub_server[1]})


def token_body(**changes: Any) -> dict[str, Any]:
    body = {
        "access_token": CANARY_JWT,
        "issued_token_type": TOKEN_TYPE_ACCESS_TOKEN,
        "token_type": "Bearer",
        "expires_in": 3600,
    }
    return {k: v for k, v in {**body, **changes}.items() if v is not ...}


class TestAgainstAStubUpstream:
    @pytest.mark.parametrize(
        ("status", "body", "upstream_error"),
        [
            (401, None, "unknown"),
            (401, {"error": "invalid_grant"}, "invalid_grant"),
            (401, {"error": "invalid_client"}, "invalid_client"),
            (401, {"error": f"no such token {TOKEN}"}, "unknown"),
            (400, {"error": "invalid_request", "error_description": TOKEN}, "invalid_request"),
        ],
    )
    async def test_rejections(
        self,
        stub_client: PhraseIdmClient,
        stub: StubUpstream,
        status: int,
        body: Any,
        upstream_error: str,
    ) -> None:
        if body is None:
            stub.reply = StubReply(status, [b"Unauthorized"], {"content-type": "text/plain"})
        else:
            stub.set_json(status, body)

        with pytest.raises(CredentialRejected) as caught:
            await stub_client.exchange(Region.EU, TOKEN)

        assert caught.value.upstream_error == upstream_error
        assert caught.value.status == status
        assert secret_free(caught.value, TOKEN, "no such token")
        assert stub.hits == 1

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (400, {"error": "unsupported_grant_type"}),
            (400, {"error": "invalid_client"}),
            (400, None),
            (403, {"error": "invalid_grant"}),
            (404, None),
            (204, None),
        ],
    )
    async def test_other_statuses_mean_our_request_is_wrong(
        self, stub_client: PhraseIdmClient, stub: StubUpstream, status: int, body: Any
    ) -> None:
        stub.reply = StubReply(status, [json.dumps(body).encode() if body else b""])

        with pytest.raises(UpstreamBadResponse) as caught:
            await stub_client.exchange(Region.EU, TOKEN)

        assert caught.value.status == status

    @pytest.mark.parametrize(
        "changes",
        [
            {"access_token": ...},
            {"access_token": ""},
            {"access_token": 42},
            {"access_token": f"{CANARY_JWT}\r\nX-Injected: 1"},
            {"token_type": "MAC"},
            {"token_type": ...},
            {"expires_in": ...},
            {"expires_in": True},
            {"expires_in": 3600.0},
            {"expires_in": "3600"},
            {"expires_in": 0},
            {"expires_in": 86401},
            {"issued_token_type": 7},
        ],
    )
    async def test_invalid_token_responses(
        self, stub_client: PhraseIdmClient, stub: StubUpstream, changes: dict[str, Any]
    ) -> None:
        stub.set_json(200, token_body(**changes))

        with pytest.raises(UpstreamBadResponse) as caught:
            await stub_client.exchange(Region.EU, TOKEN)

        assert secret_free(caught.value, TOKEN, CANARY_JWT)

    @pytest.mark.parametrize("body", [[token_body()], "a string", 3])
    async def test_json_that_is_not_an_object(
        self, stub_client: PhraseIdmClient, stub: StubUpstream, body: Any
    ) -> None:
        stub.set_json(200, body)

        with pytest.raises(UpstreamBadResponse):
            await stub_client.exchange(Region.EU, TOKEN)

    async def test_lenient_where_the_spec_allows(
        self, stub_client: PhraseIdmClient, stub: StubUpstream
    ) -> None:
        stub.set_json(200, token_body(token_type="bearer", issued_token_type=..., expires_in=86400))

        token = await stub_client.exchange(Region.EU, TOKEN)

        assert token == ExchangedToken(
            access_token=CANARY_JWT,
            expires_in=86400,
            token_type="Bearer",
            issued_token_type=TOKEN_TYPE_ACCESS_TOKEN,
            requested_at=token.requested_at,
        )

    async def test_retry_after_as_http_date(
        self, stub_client: PhraseIdmClient, stub: StubUpstream
    ) -> None:
        date = email.utils.formatdate(time.time() + 30, usegmt=True)
        stub.set_json(503, {"error": "temporarily_unavailable"}, **{"Retry-After": date})

        with pytest.raises(UpstreamUnavailable) as caught:
            await stub_client.exchange(Region.EU, TOKEN)

        assert caught.value.retry_after is not None
        assert 28 <= caught.value.retry_after <= 30

    async def test_a_trickling_body_hits_the_total_deadline(
        self, http: httpx.AsyncClient, stub: StubUpstream, stub_server: tuple[StubUpstream, str]
    ) -> None:
        # Each chunk arrives well within the read timeout, so only a whole-exchange deadline helps.
        stub.reply = StubReply(200, [b" "] * 50, chunk_delay=0.05)
        client = PhraseIdmClient(http, {Region.EU: stub_server[1]}, total_timeout=0.5)
        started = time.monotonic()

        with pytest.raises(UpstreamTimeout):
            await client.exchange(Region.EU, TOKEN)

        assert time.monotonic() - started < 1.5


class TestParseRetryAfter:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("7", 7.0),
            (" 0 ", 0.0),
            ("61", 60.0),
            ("9" * 400, 60.0),
            (None, None),
            ("", None),
            ("-3", None),
            ("1.5", None),
            ("soon", None),
            ("Wed, 21 Oct 2015 07:28:00", None),  # an HTTP-date without its GMT zone
            ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
            ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ],
    )
    def test_values(self, value: str | None, expected: float | None) -> None:
        now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
        assert parse_retry_after(value, now=now) == expected


def test_build_http_client_is_explicit() -> None:
    client = build_http_client(connect_timeout=1.5, timeout=4, user_agent="tokenvend/test")

    assert client.timeout == httpx.Timeout(4, connect=1.5)
    assert client.follow_redirects is False
    assert client.trust_env is False
    assert client.headers["user-agent"] == "tokenvend/test"


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts the response bytes the client actually pulled off the wire."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.bytes_read = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountingStream(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CountingStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, owner: CountingTransport) -> None:
        self._inner = inner
        self._owner = owner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._owner.bytes_read += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()
