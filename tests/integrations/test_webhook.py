"""Webhook notifications to a real receiver: one per status change, signed, retried, never on the
request's path."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr

from app.core.config import Settings
from app.integrations.phrase.dev_idm import DevIdm
from app.integrations.webhook import WebhookNotifier
from app.main import create_app
from tests.conftest import Api, Env, make_settings
from tests.support.servers import ServerThread

SECRET = "whsec-test-0123456789abcdef"


@dataclass
class Delivery:
    at: float
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """What the receiver does (answer statuses in turn, sleep) and what it received."""

    url: str
    statuses: list[int] = field(default_factory=list)  # answered in turn, then 200
    delay: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self, event: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.json["event"] == event and d.answered < 300]

    def attempts(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)


@dataclass
class Receivers:
    """The module's receiver server; each test installs its own `Receiver` as the current one."""

    url: str
    current: Receiver | None = None


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receivers]:
    app = FastAPI()
    with ServerThread(app) as server:
        receivers = Receivers(f"{server.url}/hooks/tokenvend")

        @app.post("/hooks/tokenvend")
        async def hook(request: Request) -> Response:
            state = receivers.current
            assert state is not None
            body = await request.body()
            with state.lock:
                status = state.statuses.pop(0) if state.statuses else 200
                state.deliveries.append(
                    Delivery(time.monotonic(), dict(request.headers), body, status)
                )
            if state.delay:
                await asyncio.sleep(state.delay)
            return Response(status_code=status)

        yield receivers


@pytest.fixture
def receiver(receiver_server: Receivers) -> Iterator[Receiver]:
    receiver_server.current = Receiver(receiver_server.url)
    yield receiver_server.current
    receiver_server.current = None


def verify(delivery: Delivery, secret: str = SECRET) -> int:
    """Check the signature as a receiver would; the signed timestamp."""
    parts = dict(p.split("=", 1) for p in delivery.headers["x-tokenvend-signature"].split(","))
    expected = hmac.new(
        secret.encode(), f"{parts['t']}.".encode() + delivery.body, hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(parts["v1"], expected)
    return int(parts["t"])


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tokenvend.test") as http:
            yield app, http


def with_webhook(env: Env, receiver: Receiver, **overrides: Any) -> Settings:
    return make_settings(
        **{
            **env.settings.model_dump(),
            "webhook_url": receiver.url,
            "webhook_secret": SECRET,
            "rejected_retry_seconds": 1,
            **overrides,
        }
    )


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def vend(http: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await http.get("/v1/teams/acme/token", headers=headers)


async def rejected_credential(
    http: httpx.AsyncClient, env: Env, idm: DevIdm
) -> tuple[str, dict[str, str]]:
    api = Api(http, env.admin_key)
    await api.team()
    token = await api.credential()
    _, client = await api.client(["acme"])
    idm.revoke(token)
    return token, client


class TestStatusChangeDeliveries:
    async def test_a_rejection_is_delivered_once_signed_even_with_50_concurrent_failing_vends(
        self, env: Env, idm: DevIdm, receiver: Receiver
    ) -> None:
        async with running(with_webhook(env, receiver)) as (_, http):
            token, client = await rejected_credential(http, env, idm)

            responses = await asyncio.gather(*(vend(http, client) for _ in range(50)))

            assert [r.status_code for r in responses] == [424] * 50
            await wait_for(lambda: len(receiver.attempts()) >= 1)
            # The IdM is asked again after rejected_retry_seconds and refuses again: the status
            # does not change, so nothing more is delivered.
            await asyncio.sleep(1.1)
            assert (await vend(http, client)).status_code == 424
            assert idm.requests == 2
            await asyncio.sleep(0.5)

            deliveries = receiver.attempts()
            assert len(deliveries) == 1
            delivery = deliveries[0]
            assert delivery.headers["x-tokenvend-event"] == "credential.rejected"
            assert delivery.headers["content-type"] == "application/json"
            signed_at = verify(delivery)
            assert abs(time.time() - signed_at) < 10
            body = delivery.json
            assert body["event"] == "credential.rejected"
            assert (body["team"], body["credential"], body["region"]) == ("acme", "default", "eu")
            assert body["error"] == "invalid_grant"
            assert token not in delivery.body.decode()
            with pytest.raises(AssertionError):
                verify(delivery, secret="another-secret")

    async def test_a_tampered_body_fails_verification(
        self, env: Env, idm: DevIdm, receiver: Receiver
    ) -> None:
        async with running(with_webhook(env, receiver)) as (_, http):
            _, client = await rejected_credential(http, env, idm)
            assert (await vend(http, client)).status_code == 424
            await wait_for(lambda: len(receiver.attempts()) == 1)

        delivery = receiver.attempts()[0]
        tampered = Delivery(
            delivery.at, delivery.headers, delivery.body.replace(b"acme", b"evil"), 200
        )
        with pytest.raises(AssertionError):
            verify(tampered)

    async def test_recovery_of_the_same_api_token_is_delivered_once(
        self, env: Env, idm: DevIdm, receiver: Receiver
    ) -> None:
        async with running(with_webhook(env, receiver)) as (_, http):
            token, client = await rejected_credential(http, env, idm)
            assert (await vend(http, client)).status_code == 424
            idm.register(token)  # Phrase accepts the same token again
            await asyncio.sleep(1.1)  # rejected_retry_seconds

            responses = await asyncio.gather(*(vend(http, client) for _ in range(20)))

            assert [r.status_code for r in responses] == [200] * 20
            await wait_for(lambda: len(receiver.events("credential.recovered")) == 1)
            await asyncio.sleep(0.3)
            assert [d.json["event"] for d in receiver.attempts()] == [
                "credential.rejected",
                "credential.recovered",
            ]
            recovered = receiver.events("credential.recovered")[0]
            verify(recovered)
            assert recovered.json["error"] is None

    async def test_recovery_by_rotation_is_delivered_once(
        self, env: Env, idm: DevIdm, receiver: Receiver
    ) -> None:
        async with running(with_webhook(env, receiver)) as (_, http):
            _, client = await rejected_credential(http, env, idm)
            assert (await vend(http, client)).status_code == 424
            r = await http.put(
                "/v1/teams/acme/credentials/default/api-token",
                json={"api_token": "phrdev_rotated_0001"},
                headers=Api(http, env.admin_key).admin,
            )
            assert r.status_code == 200
            assert (await vend(http, client)).status_code == 200

            await wait_for(lambda: len(receiver.events("credential.recovered")) == 1, within=1.0)


class TestDelivery:
    async def test_a_failing_receiver_gets_the_same_signed_delivery_again_until_it_accepts(
        self, receiver: Receiver
    ) -> None:
        receiver.statuses = [500, 500]
        async with httpx.AsyncClient() as http:
            notifier = WebhookNotifier(
                receiver.url, SecretStr(SECRET), http, attempts=5, backoff=0.05
            )
            started = time.monotonic()
            notifier.notify("credential.rejected", {"team": "acme", "credential": "default"})
            await wait_for(lambda: len(receiver.attempts()) == 3, within=3)
            await notifier.drain()

        attempts = receiver.attempts()
        assert [d.answered for d in attempts] == [500, 500, 200]
        assert len({d.body for d in attempts}) == 1  # the same event, not three
        for d in attempts:
            verify(d)
        # Full jitter: waits of at most 0.05 s and 0.1 s between the attempts.
        assert attempts[-1].at - started < 0.15 + 1.0
        await asyncio.sleep(0.3)
        assert len(receiver.attempts()) == 3  # accepted: no more attempts

    async def test_a_receiver_that_never_accepts_gets_a_bounded_number_of_attempts(
        self, receiver: Receiver
    ) -> None:
        receiver.statuses = [503] * 10
        async with httpx.AsyncClient() as http:
            notifier = WebhookNotifier(
                receiver.url, SecretStr(SECRET), http, attempts=3, backoff=0.01
            )
            notifier.notify("credential.rejected", {"team": "acme"})
            await notifier.drain()

        assert [d.answered for d in receiver.attempts()] == [503] * 3

    async def test_the_vend_never_waits_for_the_webhook(
        self, env: Env, idm: DevIdm, receiver: Receiver
    ) -> None:
        receiver.delay = 2.0
        async with running(with_webhook(env, receiver)) as (_, http):
            _, client = await rejected_credential(http, env, idm)

            started = time.monotonic()
            r = await vend(http, client)
            took = time.monotonic() - started

            assert r.status_code == 424
            assert took < 0.5, took
            await wait_for(lambda: len(receiver.attempts()) == 1)
            # The receiver is still sleeping on it; the service keeps answering meanwhile.
            started = time.monotonic()
            assert (await vend(http, client)).status_code == 424
            assert time.monotonic() - started < 0.5
