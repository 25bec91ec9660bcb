"""`PhraseAuth`: httpx authentication for requests to Phrase APIs with a JWT from tokenvend.

    with TokenVendClient(url, key) as tv, httpx.Client(auth=PhraseAuth(tv, "acme")) as phrase:
        phrase.get("https://eu.phrase.com/strings/api/v2/projects")

Each request carries `Authorization: Bearer <JWT>` (from the client's local cache when it has one).
When Phrase answers 401, the JWT was refused (revoked, or expired early): the auth asks tokenvend
once for a replacement, naming the refused JWT by its SHA-256 so that tokenvend replaces it only if
it is still the one it has cached, and sends the request again once with the new JWT. A second 401
is returned to the caller as it is.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from tokenvend_client.client import AsyncTokenVendClient, TokenVendClient, VendedToken


class PhraseAuth(httpx.Auth):
    """Use with an `httpx.Client` and a `TokenVendClient`, or an `httpx.AsyncClient` and an
    `AsyncTokenVendClient`."""

    def __init__(
        self,
        client: TokenVendClient | AsyncTokenVendClient,
        team: str,
        credential: str = "default",
    ) -> None:
        self.client = client
        self.team = team
        self.credential = credential

    def __repr__(self) -> str:
        return f"PhraseAuth(team={self.team!r}, credential={self.credential!r})"

    def _sign(self, request: httpx.Request, token: VendedToken) -> httpx.Request:
        request.headers["Authorization"] = token.authorization
        return request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        client = self.client
        if not isinstance(client, TokenVendClient):
            raise TypeError("PhraseAuth on an httpx.Client needs a TokenVendClient")
        token = client.token(self.team, credential=self.credential)
        response = yield self._sign(request, token)
        if response.status_code == httpx.codes.UNAUTHORIZED:
            fresh = client.token(
                self.team, credential=self.credential, rejected_sha256=token.sha256
            )
            yield self._sign(request, fresh)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        client = self.client
        if not isinstance(client, AsyncTokenVendClient):
            raise TypeError("PhraseAuth on an httpx.AsyncClient needs an AsyncTokenVendClient")
        token = await client.token(self.team, credential=self.credential)
        response = yield self._sign(request, token)
        if response.status_code == httpx.codes.UNAUTHORIZED:
            fresh = await client.token(
                self.team, credential=self.credential, rejected_sha256=token.sha256
            )
            yield self._sign(request, fresh)
