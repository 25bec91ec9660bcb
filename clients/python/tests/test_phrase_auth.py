"""PhraseAuth against a real tokenvend and a small fake Phrase product API (a real HTTP server)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from conftest import TEAM, Tokenvend
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from tokenvend_client import AsyncTokenVendClient, PhraseAuth, TokenVendClient

from tests.support.servers import ServerThread


@dataclass
class FakePhrase:
    """Refuses the first JWT it sees (and, with `refuse_all`, every JWT); records what it got."""

    url: str = ""
    refuse_all: bool = False
    seen: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/strings/api/v2/projects")
        async def projects(request: Request) -> JSONResponse:
            authorization = request.headers.get("authorization", "")
            self.seen.append(authorization)
            if self.refuse_all or authorization == self.seen[0]:
                return JSONResponse({"message": "Unauthorized"}, status_code=401)
            return JSONResponse([{"id": "p1"}])

        return app

    @property
    def projects(self) -> str:
        return f"{self.url}/strings/api/v2/projects"

    def jwts(self) -> list[str]:
        return [a.removeprefix("Bearer ") for a in self.seen]


@pytest.fixture
def phrase() -> Iterator[FakePhrase]:
    fake = FakePhrase()
    with ServerThread(fake.app()) as server:
        fake.url = server.url
        yield fake


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_each_request_carries_the_cached_jwt(
    tokenvend: Tokenvend, http: httpx.Client, phrase: FakePhrase
) -> None:
    phrase.seen.append("Bearer refused-by-nobody")  # nothing sent by the auth is refused
    tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http)
    with httpx.Client(auth=PhraseAuth(tv, TEAM)) as client:
        assert client.get(phrase.projects).status_code == 200
        assert client.get(phrase.projects).status_code == 200

    jwt = tv.token(TEAM).access_token
    assert phrase.seen[1:] == [f"Bearer {jwt}", f"Bearer {jwt}"]
    assert len(tokenvend.token_requests()) == 1


def test_a_refused_jwt_is_reported_by_its_sha256_and_the_request_retried_once(
    tokenvend: Tokenvend, http: httpx.Client, phrase: FakePhrase
) -> None:
    tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http)
    with httpx.Client(auth=PhraseAuth(tv, TEAM)) as client:
        client.get(phrase.projects)

    assert len(phrase.seen) == 2
    requests = tokenvend.token_requests()
    assert len(requests) == 2
    assert "rejected_sha256" not in requests[0].url.params
    assert requests[1].url.params["rejected_sha256"] == sha256(phrase.jwts()[0])


async def test_async_a_refused_jwt_is_reported_by_its_sha256_and_the_request_retried_once(
    tokenvend: Tokenvend, async_http: httpx.AsyncClient, phrase: FakePhrase
) -> None:
    tv = AsyncTokenVendClient(tokenvend.url, tokenvend.client_key, http=async_http)
    async with httpx.AsyncClient(auth=PhraseAuth(tv, TEAM)) as client:
        await client.get(phrase.projects)

    assert len(phrase.seen) == 2
    requests = tokenvend.token_requests()
    assert len(requests) == 2
    assert "rejected_sha256" not in requests[0].url.params
    assert requests[1].url.params["rejected_sha256"] == sha256(phrase.jwts()[0])


def test_a_refused_jwt_is_replaced_and_the_request_succeeds(
    tokenvend: Tokenvend, http: httpx.Client, phrase: FakePhrase
) -> None:
    tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http)
    with httpx.Client(auth=PhraseAuth(tv, TEAM)) as client:
        response = client.get(phrase.projects)

    assert response.status_code == 200
    first, second = phrase.jwts()
    assert second != first
    assert tokenvend.idm.exchanges == 2
    retry = tokenvend.token_requests()[1]
    assert retry.url.params["rejected_sha256"] == sha256(first)
    assert tv.token(TEAM).access_token == second  # the replacement is what the cache holds now


async def test_many_requests_refused_at_once_cause_one_replacement(
    tokenvend: Tokenvend, async_http: httpx.AsyncClient, phrase: FakePhrase
) -> None:
    tv = AsyncTokenVendClient(tokenvend.url, tokenvend.client_key, http=async_http)
    refused = await tv.token(TEAM)
    phrase.seen.append(refused.authorization)  # Phrase refuses the JWT every caller starts with

    async with httpx.AsyncClient(auth=PhraseAuth(tv, TEAM)) as client:
        responses = await asyncio.gather(*(client.get(phrase.projects) for _ in range(20)))

    assert [r.status_code for r in responses] == [200] * 20
    assert len(set(phrase.seen[1:])) == 2  # the refused JWT, then one replacement for all
    assert tokenvend.idm.exchanges == 2
    assert len(tokenvend.token_requests()) == 2  # the first vend and one report of the refusal


def test_a_second_401_is_returned_without_another_retry(
    tokenvend: Tokenvend, http: httpx.Client, phrase: FakePhrase
) -> None:
    phrase.refuse_all = True
    tv = TokenVendClient(tokenvend.url, tokenvend.client_key, http=http)
    with httpx.Client(auth=PhraseAuth(tv, TEAM)) as client:
        response = client.get(phrase.projects)

    assert response.status_code == 401
    assert len(phrase.seen) == 2
    assert len(tokenvend.token_requests()) == 2


def test_a_sync_http_client_needs_a_sync_tokenvend_client(
    tokenvend: Tokenvend, phrase: FakePhrase
) -> None:
    tv = AsyncTokenVendClient(tokenvend.url, tokenvend.client_key)
    with httpx.Client(auth=PhraseAuth(tv, TEAM)) as client, pytest.raises(TypeError):
        client.get(phrase.projects)
    assert phrase.seen == []
    assert repr(PhraseAuth(tv, TEAM)) == "PhraseAuth(team='acme', credential='default')"
