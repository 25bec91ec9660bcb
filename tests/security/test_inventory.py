"""The route inventory gate: every route of the application is authenticated or explicitly public.

"Authenticated" means the route's effective dependency tree (router-level dependencies included)
contains `app.auth.dependencies.current_client`, which refuses a missing or bad key with 401
before anything else runs. Anything else must be on a reviewed list below. Adding a route without
authentication, or mounting a sub-application, fails this test until someone decides, in review,
that it is public.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, WebSocket
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.staticfiles import StaticFiles
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from app.auth.dependencies import current_client
from app.core.config import Settings
from app.main import create_app
from tests.conftest import make_settings

# Reachable without a client key, on purpose (design.md: probes, metrics, the API explorer).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
)

# Routes that authenticate the caller themselves, without `current_client`. Each entry was
# reviewed; tests/security/test_matrix.py proves the route refuses every bad caller.
AUTHENTICATES_ITSELF: dict[tuple[str, str], str] = {
    # RFC 8693 / RFC 6749 token endpoint: OAuth clients authenticate in the form body or with HTTP
    # Basic, and must get RFC 6749 5.2 `invalid_client` errors rather than a problem document, so
    # the route parses the credentials itself and then calls the same Authenticator and rate
    # limiter as `current_client` (`app.oauth.router._authenticate`).
    ("POST", "/oauth/token"): "OAuth client authentication (app.oauth.router._authenticate)",
}

# Route classes whose handler is not the one FastAPI builds from the dependant: the dependency
# check above cannot see what such a handler runs, so each class was reviewed.
OWN_HANDLERS: dict[str, str] = {
    # The token route's fast path authenticates with `client_for_key`, the body of
    # `current_client`, before anything else; tests/tokens/test_fast_route.py proves it accepts
    # only what the declaration accepts and answers as the declared handler does.
    "VendRoute": "app.tokens.router.VendRoute",
}

# Mounted sub-applications are opaque to the dependency check, so each one is listed here.
# The API explorer's assets (Swagger UI's JS/CSS, served by tokenvend so /docs works offline): a
# StaticFiles app serves files from a directory and nothing else, as public as /docs itself.
DOCS_ASSETS_MOUNT = "/docs/static"
# The development IdM (`serve --dev` only): a stand-in for Phrase with no authentication.
DEV_IDM_MOUNT = "/dev-idm"


@dataclass(frozen=True)
class Entry:
    """One route as the application will route it."""

    kind: str
    path: str
    methods: frozenset[str]
    route: BaseRoute
    dependant: Dependant | None


def inventory(app: FastAPI) -> Iterator[Entry]:
    """Every route with its effective dependant, through included routers at any depth."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before lazy router inclusion: app.routes is already flat
        contexts: list[Any] = list(app.routes)
    else:
        contexts = list(iter_route_contexts(app.routes))
    for context in contexts:
        route = getattr(context, "original_route", context)
        methods = frozenset(getattr(context, "methods", None) or ())
        yield Entry(
            kind=type(route).__name__,
            path=str(context.path),
            methods=methods - {"HEAD"},  # HEAD rides along with GET
            route=route,
            dependant=getattr(context, "dependant", None),
        )


def calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from calls(dep)


def violations(app: FastAPI, settings: Settings) -> list[str]:
    """What makes the application fail the gate, one line per offending route."""
    found: list[str] = []
    if current_client in app.dependency_overrides:
        found.append("app.dependency_overrides replaces current_client")
    for entry in inventory(app):
        label = f"{entry.kind} {','.join(sorted(entry.methods)) or '*'} {entry.path}"
        if isinstance(entry.route, Mount):
            is_assets = entry.path == DOCS_ASSETS_MOUNT and isinstance(entry.route.app, StaticFiles)
            is_dev_idm = entry.path == DEV_IDM_MOUNT and settings.dev
            if not (is_assets or is_dev_idm):
                found.append(f"{label}: a mounted application, not reviewed")
            continue
        if isinstance(entry.route, WebSocketRoute | APIWebSocketRoute):
            found.append(f"{label}: a websocket route, not reviewed")
            continue
        if not isinstance(entry.route, APIRoute | Route):
            found.append(f"{label}: an unknown kind of route")
            continue
        own = isinstance(entry.route, APIRoute) and (
            type(entry.route).get_route_handler is not APIRoute.get_route_handler
        )
        if own and entry.kind not in OWN_HANDLERS:
            found.append(f"{label}: a route class with its own handler, not reviewed")
        authenticated = entry.dependant is not None and current_client in set(
            calls(entry.dependant)
        )
        reviewed = all((m, entry.path) in AUTHENTICATES_ITSELF for m in entry.methods)
        if not (authenticated or entry.path in PUBLIC_PATHS or (entry.methods and reviewed)):
            found.append(f"{label}: neither authenticated nor on the public allow-list")
        if authenticated and entry.path in PUBLIC_PATHS:
            found.append(f"{label}: on the public allow-list but authenticated; fix the list")
    return found


CONFIGURATIONS = {
    "production": {},
    "dev": {"dev": True},
    "no-docs-no-metrics": {"docs_enabled": False, "metrics_enabled": False},
    "cors": {"cors_origins": ["https://ok.example"]},
}


@pytest.fixture(params=list(CONFIGURATIONS))
def settings(request: pytest.FixtureRequest) -> Settings:
    return make_settings(**CONFIGURATIONS[request.param])


class TestInventoryGate:
    def test_every_route_is_authenticated_or_public(self, settings: Settings) -> None:
        app = create_app(settings)
        assert violations(app, settings) == []

    def test_the_inventory_sees_the_whole_api(self, settings: Settings) -> None:
        """Guards the gate itself: a walk that missed the included routers would pass anything."""
        app = create_app(settings)
        entries = list(inventory(app))
        authenticated = {
            (m, e.path)
            for e in entries
            if e.dependant is not None and current_client in set(calls(e.dependant))
            for m in e.methods
        }
        assert len(authenticated) >= 20
        assert ("GET", "/v1/teams/{team}/token") in authenticated
        assert ("DELETE", "/v1/clients/{client_id}") in authenticated
        assert {e.path for e in entries} >= {"/healthz", "/readyz"}

    def test_the_gate_fails_on_routes_added_without_authentication(self) -> None:
        settings = make_settings()
        app = create_app(settings)

        @app.get("/v1/leak")
        async def leak() -> dict[str, str]:
            return {}

        nested = APIRouter(prefix="/v1/nested")
        inner = APIRouter(prefix="/deeper")

        @inner.post("/leak")
        async def nested_leak() -> None:
            return None

        nested.include_router(inner)
        app.include_router(nested)
        app.mount("/admin-ui", FastAPI())

        @app.websocket("/ws")
        async def socket(websocket: WebSocket) -> None:
            return None

        # A public path's name does not cover other methods under another path.
        app.add_api_route("/oauth/token/debug", leak, methods=["GET"])

        class ShortcutRoute(APIRoute):
            def get_route_handler(self) -> Any:
                return leak

        # Authenticated by its declaration, but its handler skips the dependant.
        app.router.add_api_route(
            "/v1/shortcut",
            leak,
            methods=["GET"],
            dependencies=[Depends(current_client)],
            route_class_override=ShortcutRoute,
        )

        found = violations(app, settings)

        assert any("GET /v1/shortcut: a route class with its own handler" in v for v in found)
        assert any("GET /v1/leak:" in v for v in found), found
        assert any("POST /v1/nested/deeper/leak:" in v for v in found), found
        assert any("/admin-ui: a mounted application" in v for v in found), found
        assert any("/ws: a websocket route" in v for v in found), found
        assert any("GET /oauth/token/debug:" in v for v in found), found
        assert len(found) == 6, found

    def test_overriding_current_client_fails_the_gate(self) -> None:
        settings = make_settings()
        app = create_app(settings)
        app.dependency_overrides[current_client] = lambda: None
        assert violations(app, settings) == ["app.dependency_overrides replaces current_client"]

    def test_the_dev_idm_is_mounted_only_in_dev_mode(self) -> None:
        production = make_settings()
        mounts = {e.path for e in inventory(create_app(production)) if isinstance(e.route, Mount)}
        assert DEV_IDM_MOUNT not in mounts
        # The mount is only acceptable because settings.dev is set: the same app judged as a
        # production app fails.
        dev_app = create_app(make_settings(dev=True))
        assert any(e.path == DEV_IDM_MOUNT for e in inventory(dev_app))
        assert violations(dev_app, production) == [
            f"Mount * {DEV_IDM_MOUNT}: a mounted application, not reviewed"
        ]

    def test_disabling_the_docs_removes_the_explorer_and_its_assets(self) -> None:
        app = create_app(make_settings(docs_enabled=False))
        paths = {e.path for e in inventory(app)}
        assert not paths & {"/docs", "/openapi.json", DOCS_ASSETS_MOUNT}
