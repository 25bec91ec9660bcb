"""The tokenvend clients: a team's Phrase JWT from `GET /v1/teams/{team}/token`, cached locally.

A JWT is reused while it has more than `max(min_ttl, leeway)` seconds to live. Its remaining life
is the smaller of what `expires_at` says on this machine's clock and `expires_in` counted on the
monotonic clock from the moment the request was sent, so neither a skewed nor a jumping wall clock
lets the client hand out an expired JWT.

Only one request per (team, credential) is in flight at a time: callers that miss the cache queue
on a per-key lock and read the cache again once they hold it, so a burst of callers causes one
request. If that request fails, the callers that were queued behind it get the same error instead
of asking again one after the other.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import httpx

from tokenvend_client.errors import (
    TokenVendError,
    error_from_response,
    error_from_transport,
    redact,
)

__version__ = "0.1.0"
USER_AGENT = f"tokenvend-client/{__version__}"
Key = tuple[str, str]
LockT = TypeVar("LockT", threading.Lock, asyncio.Lock)


def sha256_hex(token: str) -> str:
    """The hex SHA-256 of a JWT: how a refused JWT is named to tokenvend (`rejected_sha256`)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class VendedToken:
    """A Phrase JWT as tokenvend vended it. `cache` says whether tokenvend had it cached (`hit`) or
    exchanged it at Phrase for this request (`miss`); it is not about this client's local cache."""

    access_token: str = field(repr=False)
    expires_at: dt.datetime
    expires_in: int
    team: str
    credential: str
    region: str
    cache: str

    @property
    def sha256(self) -> str:
        return sha256_hex(self.access_token)

    @property
    def authorization(self) -> str:
        """The value of an `Authorization` header for Phrase."""
        return f"Bearer {self.access_token}"


@dataclass(frozen=True, slots=True)
class _Entry:
    token: VendedToken
    deadline: float  # time.monotonic() when the JWT expires, counted from the request's start

    def remaining(self) -> float:
        by_wall_clock = self.token.expires_at.timestamp() - time.time()
        return min(by_wall_clock, self.deadline - time.monotonic())


@dataclass(slots=True)
class _Slot(Generic[LockT]):
    """Per (team, credential): the lock that keeps one request in flight, and how the last
    request ended, so that callers queued behind a failed request share its error."""

    lock: LockT
    finished: int = 0
    failure: TokenVendError | None = None


class _Core(Generic[LockT]):
    """What the sync and async clients share: configuration, the cache, requests and answers."""

    def __init__(self, base_url: str, api_key: str, *, leeway: float) -> None:
        if not api_key:
            raise ValueError("api_key is empty")
        if leeway < 0:
            raise ValueError("leeway must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.leeway = leeway
        self._api_key = api_key
        self._cache: dict[Key, _Entry] = {}
        self._slots: dict[Key, _Slot[LockT]] = {}
        self._slots_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def invalidate(self, team: str, credential: str = "default") -> None:
        """Forget the locally cached JWT; the next `token()` asks tokenvend."""
        self._cache.pop((team, credential), None)

    def _new_lock(self) -> LockT:
        raise NotImplementedError

    def _slot(self, key: Key) -> _Slot[LockT]:
        with self._slots_guard:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(self._new_lock())
            return slot

    def _cached(
        self, key: Key, min_ttl: float | None, rejected_sha256: str | None
    ) -> VendedToken | None:
        entry = self._cache.get(key)
        if entry is None or entry.remaining() <= max(min_ttl or 0, self.leeway):
            return None
        if rejected_sha256 is not None and entry.token.sha256 == rejected_sha256.lower():
            return None
        return entry.token

    def _forget_rejected(self, key: Key, rejected_sha256: str | None) -> None:
        entry = self._cache.get(key)
        if rejected_sha256 and entry and entry.token.sha256 == rejected_sha256.lower():
            self._cache.pop(key, None)

    def _request(
        self, team: str, credential: str, min_ttl: float | None, rejected_sha256: str | None
    ) -> tuple[str, dict[str, str | int], dict[str, str]]:
        params: dict[str, str | int] = {"credential": credential}
        if min_ttl is not None:
            # Never ask for less than the local reuse threshold, or the answer is stale on arrival.
            params["min_ttl"] = math.ceil(max(min_ttl, self.leeway))
        if rejected_sha256 is not None:
            params["rejected_sha256"] = rejected_sha256.lower()
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        return f"{self.base_url}/v1/teams/{quote(team, safe='')}/token", params, headers

    def _answer(self, key: Key, response: httpx.Response, sent_at: float) -> VendedToken:
        if not response.is_success:
            raise error_from_response(response, self._api_key)
        token = self._parse(response)
        self._cache[key] = _Entry(token, sent_at + token.expires_in)
        return token

    def _parse(self, response: httpx.Response) -> VendedToken:
        def bad(why: str) -> TokenVendError:
            request_id = response.headers.get("x-request-id")
            return TokenVendError(response.status_code, "bad-response", why, request_id)

        try:
            body: Any = response.json()
        except ValueError:
            raise bad("the token response is not JSON") from None
        if not isinstance(body, dict):
            raise bad("the token response is not a JSON object")
        try:
            access_token = body["access_token"]
            expires_in = body["expires_in"]
            expires_at = dt.datetime.fromisoformat(body["expires_at"])
            team, credential = str(body["team"]), str(body["credential"])
            region, cache = str(body["region"]), str(body["cache"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"the token response lacks or garbles {redact(str(exc))[:100]}") from None
        if not isinstance(access_token, str) or not access_token:
            raise bad("the token response has no access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int):
            raise bad("the token response has no integer expires_in")
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=dt.UTC)
        return VendedToken(access_token, expires_at, expires_in, team, credential, region, cache)

    def _shared_failure(self, slot: _Slot[LockT], ticket: int) -> TokenVendError | None:
        """The error of a request that finished while this caller waited for the lock."""
        if slot.finished != ticket and slot.failure is not None:
            return copy.copy(slot.failure)
        return None

    @staticmethod
    def _finish(slot: _Slot[LockT], failure: TokenVendError | None) -> None:
        slot.finished += 1
        slot.failure = failure


class TokenVendClient(_Core[threading.Lock]):
    """Vends a team's Phrase JWT from tokenvend, cached locally; safe to share between threads.

        with TokenVendClient("http://tokenvend:8000", api_key) as tv:
            jwt = tv.token("acme").access_token

    `http`: an `httpx.Client` of your own (then `timeout` is not applied and `close()` leaves it
    open). `leeway`: seconds of life a cached JWT must have left to be reused.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        http: httpx.Client | None = None,
        leeway: float = 60,
    ) -> None:
        super().__init__(base_url, api_key, leeway=leeway)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout)

    def _new_lock(self) -> threading.Lock:
        return threading.Lock()

    def token(
        self,
        team: str,
        *,
        credential: str = "default",
        min_ttl: float | None = None,
        rejected_sha256: str | None = None,
    ) -> VendedToken:
        """A JWT for the team's credential with more than `max(min_ttl, leeway)` seconds to live.

        `rejected_sha256`: the hex SHA-256 of a JWT that Phrase refused. That JWT is not served
        from the local cache, and tokenvend replaces it if it is still the one it has cached.
        """
        key = (team, credential)
        cached = self._cached(key, min_ttl, rejected_sha256)
        if cached is not None:
            return cached
        slot = self._slot(key)
        ticket = slot.finished
        with slot.lock:
            cached = self._cached(key, min_ttl, rejected_sha256)
            if cached is not None:
                return cached
            failure = self._shared_failure(slot, ticket)
            if failure is not None:
                raise failure
            self._forget_rejected(key, rejected_sha256)
            try:
                token = self._fetch(key, min_ttl, rejected_sha256)
            except TokenVendError as exc:
                self._finish(slot, exc)
                raise
            except BaseException:
                self._finish(slot, None)
                raise
            self._finish(slot, None)
            return token

    def _fetch(self, key: Key, min_ttl: float | None, rejected_sha256: str | None) -> VendedToken:
        url, params, headers = self._request(*key, min_ttl, rejected_sha256)
        sent_at = time.monotonic()
        try:
            response = self._http.get(url, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self._api_key) from None
        return self._answer(key, response, sent_at)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncTokenVendClient(_Core[asyncio.Lock]):
    """The asyncio twin of `TokenVendClient`; use one instance per event loop.

    async with AsyncTokenVendClient("http://tokenvend:8000", api_key) as tv:
        jwt = (await tv.token("acme")).access_token
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        http: httpx.AsyncClient | None = None,
        leeway: float = 60,
    ) -> None:
        super().__init__(base_url, api_key, leeway=leeway)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=timeout)

    def _new_lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    async def token(
        self,
        team: str,
        *,
        credential: str = "default",
        min_ttl: float | None = None,
        rejected_sha256: str | None = None,
    ) -> VendedToken:
        """See `TokenVendClient.token`."""
        key = (team, credential)
        cached = self._cached(key, min_ttl, rejected_sha256)
        if cached is not None:
            return cached
        slot = self._slot(key)
        ticket = slot.finished
        async with slot.lock:
            cached = self._cached(key, min_ttl, rejected_sha256)
            if cached is not None:
                return cached
            failure = self._shared_failure(slot, ticket)
            if failure is not None:
                raise failure
            self._forget_rejected(key, rejected_sha256)
            try:
                token = await self._fetch(key, min_ttl, rejected_sha256)
            except TokenVendError as exc:
                self._finish(slot, exc)
                raise
            except BaseException:  # cancelled: the next caller in the queue asks instead
                self._finish(slot, None)
                raise
            self._finish(slot, None)
            return token

    async def _fetch(
        self, key: Key, min_ttl: float | None, rejected_sha256: str | None
    ) -> VendedToken:
        url, params, headers = self._request(*key, min_ttl, rejected_sha256)
        sent_at = time.monotonic()
        try:
            response = await self._http.get(url, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self._api_key) from None
        return self._answer(key, response, sent_at)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
