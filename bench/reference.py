"""The reference: what a bare FastAPI endpoint costs on this machine, right now.

One route with tokenvend's path shape: check the bearer header against a constant, do one Redis
GET (redis-py asyncio, hiredis parser) and return the value as JSON the idiomatic FastAPI way
(a dict, serialized by FastAPI). Served by uvicorn with the options `tokenvend serve` uses: uvloop,
httptools, no server header; its access log is off.

Configured by the benchmark through the environment: `BENCH_REF_REDIS_URL`, `BENCH_REF_KEY` (the
Redis key holding a JWT-sized value) and `BENCH_REF_TOKEN` (the bearer token it accepts).

    python -m bench.reference --port 8100
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException
from redis.asyncio import Redis


def create_app() -> FastAPI:
    redis_url = os.environ["BENCH_REF_REDIS_URL"]
    key = os.environ["BENCH_REF_KEY"]
    expected = f"Bearer {os.environ['BENCH_REF_TOKEN']}".encode()
    redis = Redis.from_url(redis_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/teams/{team}/token")
    async def token(
        team: str, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected):
            raise HTTPException(401, "bad bearer token", headers={"WWW-Authenticate": "Bearer"})
        value = await redis.get(key)
        if value is None:
            raise HTTPException(404, "nothing cached")
        return {"access_token": value.decode(), "token_type": "Bearer", "team": team}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        "bench.reference:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        date_header=True,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
