"""Pure ASGI middleware (no per-request task or body buffering, unlike BaseHTTPMiddleware)."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from contextvars import ContextVar

import orjson
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics.registry import REQUEST_DURATION, REQUESTS

access_log = logging.getLogger("app.access")
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
_VALID_ID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"strict-transport-security", b"max-age=31536000"),
]
# The API returns JSON only. The explorer's page runs Swagger UI (served by tokenvend itself) and
# one inline script that starts it.
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
DOCS_CSP = (
    b"content-security-policy",
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; frame-ancestors 'none'",
)


@functools.cache
def _series(route: str, method: str, status: int) -> tuple[Counter, Histogram]:
    # `labels()` validates and takes a lock on every call; the children are looked up once. The
    # key space is bounded: route templates x methods x the statuses the app answers with.
    return REQUESTS.labels(route, method, str(status)), REQUEST_DURATION.labels(route, method)


def _count(route: str, method: str, status: int, elapsed: float) -> None:
    requests, duration = _series(route, method, status)
    requests.inc()
    duration.observe(elapsed)


class RequestContextMiddleware:
    """Takes `X-Request-ID` (or makes one), exposes it to handlers and logs, echoes it back, adds
    the security headers every response carries, and counts the request by route template."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
                break
        request_id = rid.decode() if _VALID_ID.match(rid) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(SECURITY_HEADERS)
                headers.append(DOCS_CSP if scope["path"] == "/docs" else API_CSP)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            # The route template, never the raw path: label values stay a small, fixed set, and
            # nothing a caller put in the URL reaches a log line.
            route = getattr(scope.get("route"), "path", None)
            # A mounted app's routes (the dev IdM, the explorer's assets) carry its prefix.
            route = f"{scope.get('root_path', '')}{route}" if route else "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            elapsed = time.perf_counter() - started
            _count(route, method, status, elapsed)
            if self.access_log and access_log.isEnabledFor(logging.INFO):
                client = getattr(scope["state"].get("client"), "id", None)
                access_log.info(
                    "http.request method=%s route=%s status=%d duration_ms=%.2f client_id=%s",
                    method,
                    route,
                    status,
                    elapsed * 1000,
                    client,
                )
            request_id_var.reset(token)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a chunked body passes the limit. An HTTPException because
    FastAPI re-raises those from its body parsing and turns anything else into a 400 "error
    parsing the body"; this way the exception handlers answer with the 413 problem."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request bodies are limited to {max_bytes} bytes")


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with a 413 problem: by Content-Length before reading
    anything, and by counting when the body is chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._refuse(scope, send)
                    return
                break
            if name == b"transfer-encoding":
                chunked = True
        else:
            if (
                not chunked
            ):  # no body at all (HTTP/1.1: neither length nor chunks): nothing to count
                await self.app(scope, receive, send)
                return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        body = orjson.dumps(
            {
                "type": "https://tokenvend.dev/problems/payload-too-large",
                "title": "Payload too large",
                "status": 413,
                "detail": f"request bodies are limited to {self.max_bytes} bytes",
                "code": "payload-too-large",
                "request_id": scope.get("state", {}).get("request_id"),
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
