"""The application factory. Nothing runs at import time."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.audit.router import router as audit_router
from app.clients.router import router as clients_router
from app.core import problems
from app.core.config import Settings
from app.core.lifespan import lifespan
from app.core.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.credentials.router import router as credentials_router
from app.health.router import router as health_router
from app.metrics.router import router as metrics_router
from app.oauth.router import router as oauth_router
from app.teams.router import router as teams_router
from app.tokens.router import router as tokens_router

DESCRIPTION = """
tokenvend keeps teams' Phrase Platform API tokens (encrypted), exchanges them for short-lived
JWTs at the Phrase IdM (RFC 8693) only when needed, caches the JWTs until shortly before they
expire, and vends them to internal services.

Authorize with a client API key (`tvk_<key id>_<secret>`). Errors are RFC 9457 problem details
with a stable `code` and the `request_id`.
"""


def _serve_explorer(app: FastAPI) -> None:
    """The OpenAPI explorer with Swagger UI's assets served by tokenvend itself: no CDN, so it
    works offline and in air-gapped deployments, and its CSP can stay `'self'`."""
    assets = files("fastapi_offline") / "static"
    app.mount("/docs/static", StaticFiles(directory=str(assets)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def explorer() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="tokenvend - API explorer",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    docs = settings.docs_enabled
    app = FastAPI(
        title="tokenvend",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local assets
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    problems.install(app)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems.document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # The token routes first: routes are matched in order, and they take nearly all the traffic.
    for router in (
        tokens_router,
        oauth_router,
        teams_router,
        credentials_router,
        clients_router,
        audit_router,
        health_router,
    ):
        app.include_router(router)
    if docs:
        _serve_explorer(app)
    if settings.metrics_enabled:
        app.include_router(metrics_router)
    if settings.dev:
        from app.integrations.phrase.dev_idm import create_dev_idm_app

        app.mount("/dev-idm", create_dev_idm_app())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    # Outermost, so even a 413 carries the request id and the security headers.
    app.add_middleware(RequestContextMiddleware, access_log=settings.access_log)
    return app
