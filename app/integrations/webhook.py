"""Outgoing notifications: a credential became rejected, or recovered.

The body is JSON; `X-Tokenvend-Signature: t=<unix time>,v1=<hex HMAC-SHA256>` signs
`"<t>.<body>"` with TOKENVEND_WEBHOOK_SECRET, so a receiver can check origin and freshness.
Deliveries run in background tasks (a request never waits for one), are retried with exponential
backoff and full jitter, and are dropped with a log line when too many are pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from typing import Any

import httpx
import orjson
from pydantic import SecretStr

log = logging.getLogger(__name__)

MAX_PENDING = 100
DRAIN_SECONDS = 5.0


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        secret: SecretStr,
        http: httpx.AsyncClient,
        *,
        attempts: int = 5,
        backoff: float = 1.0,
    ) -> None:
        self._url = url
        self._secret = secret
        self._http = http
        self._attempts = attempts
        self._backoff = backoff
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, event: str, payload: dict[str, Any]) -> None:
        if len(self._tasks) >= MAX_PENDING:
            log.error("webhook.dropped event=%s pending=%d", event, len(self._tasks))
            return
        body = orjson.dumps({"event": event, "at": time.time(), **payload})
        task = asyncio.create_task(self._deliver(event, body), name=f"webhook-{event}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: str, body: bytes) -> None:
        for attempt in range(self._attempts):
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "X-Tokenvend-Event": event,
                "X-Tokenvend-Signature": sign(
                    self._secret.get_secret_value().encode(), timestamp, body
                ),
            }
            try:
                response = await self._http.post(self._url, content=body, headers=headers)
                if response.status_code < 300:
                    log.info("webhook.delivered event=%s attempt=%d", event, attempt + 1)
                    return
                reason = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            log.warning("webhook.failed event=%s attempt=%d reason=%s", event, attempt + 1, reason)
            await asyncio.sleep(random.uniform(0, self._backoff * 2**attempt))
        log.error("webhook.gave_up event=%s", event)

    async def drain(self) -> None:
        """Give pending deliveries a moment at shutdown, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=DRAIN_SECONDS)
            for task in pending:
                task.cancel()
