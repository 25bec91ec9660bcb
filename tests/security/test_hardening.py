"""Hardened HTTP defaults, checked on real `tokenvend serve` processes: no `server` header, the
security headers and `X-Request-ID` on every response whatever its status, CORS closed unless
configured (and then only for the configured origin), the API explorer off by a setting, TRACE
refused, request bodies capped (413, by Content-Length and when chunked), over-long parameters
and oversized lists refused with 422.
"""

from __future__ import annotations

import socket
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.auth.keys import issue_key
from app.core.crypto import Keyring
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX, DevIdm, DevIdmMode
from tests.support.processes import TokenvendServer

MAX_BODY = 8192
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
    "strict-transport-security": "max-age=31536000",
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
OK_ORIGIN = "https://ok.example"
EVIL_ORIGIN = "https://evil.example"


@dataclass
class Deployment:
    server: TokenvendServer
    database: Path
    admin: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15.0)


@pytest.fixture(scope="module")
def deployments(dev_idm_server: tuple[DevIdm, str]) -> Iterator[dict[str, Deployment]]:
    """`default`: the defaults, docs on, no CORS. `locked`: CORS for one origin, docs off."""
    _, idm_url = dev_idm_server
    with tempfile.TemporaryDirectory(prefix="tokenvend-hardening-") as tmp:
        workdir = Path(tmp)
        made: dict[str, Deployment] = {}
        for name, extra in (
            ("default", {}),
            (
                "locked",
                {
                    "TOKENVEND_CORS_ORIGINS": f'["{OK_ORIGIN}"]',
                    "TOKENVEND_DOCS_ENABLED": "false",
                },
            ),
        ):
            database = workdir / f"{name}.db"
            admin_key = issue_key().key.get_secret_value()
            env = {
                "TOKENVEND_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
                "TOKENVEND_ENCRYPTION_KEYS": Keyring.generate_spec("hardening"),
                "TOKENVEND_BOOTSTRAP_ADMIN_KEY": admin_key,
                "TOKENVEND_PHRASE_EU_URL": idm_url,
                "TOKENVEND_PHRASE_US_URL": idm_url,
                "TOKENVEND_MAX_BODY_BYTES": str(MAX_BODY),
                "TOKENVEND_UPSTREAM_RETRIES": "0",
                "TOKENVEND_LOG_LEVEL": "WARNING",
                **extra,
            }
            server = TokenvendServer(workdir, env, name=name)
            made[name] = Deployment(server, database, {"Authorization": f"Bearer {admin_key}"})
        try:
            with ThreadPoolExecutor(len(made)) as pool:  # each start mostly waits for imports
                list(pool.map(lambda d: d.server.start(), made.values()))
            yield made
        finally:
            for deployment in made.values():
                deployment.server.stop()


@pytest.fixture(scope="module")
def default(deployments: dict[str, Deployment]) -> Deployment:
    """The default deployment with team `acme`, a `default` credential and a granted client."""
    deployment = deployments["default"]
    with deployment.http() as http:
        assert http.post("/v1/teams", json={"slug": "acme"}, headers=deployment.admin).is_success
        body = {"region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"}
        r = http.post("/v1/teams/acme/credentials", json=body, headers=deployment.admin)
        assert r.status_code == 201, r.text
    return deployment


def client_key(deployment: Deployment, teams: list[str]) -> dict[str, str]:
    with deployment.http() as http:
        r = http.post("/v1/clients", json={"name": "svc", "teams": teams}, headers=deployment.admin)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}


def assert_hardened(r: httpx.Response) -> None:
    where = f"{r.request.method} {r.request.url.path} -> {r.status_code}"
    assert "server" not in r.headers, where
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, f"{where}: {name}"
    expected_csp = API_CSP if r.request.url.path != "/docs" else None
    csp = r.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp, where
    if expected_csp is not None:
        assert csp == expected_csp, where
    request_id = r.headers.get("x-request-id")
    assert request_id, where
    if r.headers.get("content-type") == "application/problem+json":
        assert r.json()["request_id"] == request_id, where


class TestHeaders:
    def test_every_response_carries_the_security_headers_and_no_server_header(
        self, default: Deployment, dev_idm_server: tuple[DevIdm, str]
    ) -> None:
        idm, _ = dev_idm_server
        client = client_key(default, ["acme"])
        other = client_key(default, ["other"])
        admin = default.admin
        seen: dict[int, list[str]] = {}
        with default.http() as http:
            # A credential whose ciphertext names a key no longer in the keyring: a genuine 500.
            body = {"name": "broken", "region": "eu", "api_token": f"{ACCEPTED_PREFIX}x" * 2}
            assert http.post("/v1/teams/acme/credentials", json=body, headers=admin).is_success
            with sqlite3.connect(default.database) as db:
                db.execute("UPDATE credentials SET api_token_key_id = 'gone' WHERE name = 'broken'")
            body = {"name": "cold", "region": "eu", "api_token": f"{ACCEPTED_PREFIX}{uuid.uuid4()}"}
            assert http.post("/v1/teams/acme/credentials", json=body, headers=admin).is_success

            requests: list[tuple[str, str, dict[str, object]]] = [
                ("GET", "/healthz", {}),
                ("GET", "/readyz", {}),
                ("GET", "/metrics", {}),
                ("GET", "/openapi.json", {}),
                ("GET", "/docs", {}),
                ("GET", "/docs/static/swagger-ui.css", {}),
                ("GET", "/v1/teams", {"headers": admin}),
                ("GET", "/v1/teams/acme/token", {"headers": client}),
                ("POST", "/v1/teams", {"json": {"slug": "made"}, "headers": admin}),
                ("DELETE", "/v1/teams/made", {"headers": admin}),
                ("GET", "/v1/teams", {}),
                ("GET", "/v1/teams", {"headers": {"Authorization": "Bearer nope"}}),
                ("GET", "/v1/teams", {"headers": client}),
                ("GET", "/v1/teams/acme/token", {"headers": other}),
                ("GET", "/nope", {}),
                ("GET", "/v1/teams/ghost", {"headers": admin}),
                ("TRACE", "/v1/teams", {}),
                ("DELETE", "/healthz", {}),
                ("POST", "/v1/teams", {"content": b"{}" * MAX_BODY, "headers": admin}),
                ("GET", "/v1/teams", {"params": {"limit": 101}, "headers": admin}),
                (
                    "GET",
                    "/v1/teams/acme/token",
                    {"params": {"credential": "broken"}, "headers": client},
                ),
            ]
            for method, path, kwargs in requests:
                r = http.request(method, path, **kwargs)  # type: ignore[arg-type]
                assert_hardened(r)
                seen.setdefault(r.status_code, []).append(f"{method} {path}")
            idm.set_mode(DevIdmMode(fail_status=503))
            try:
                r = http.get("/v1/teams/acme/token", params={"credential": "cold"}, headers=client)
            finally:
                idm.reset()
            assert_hardened(r)
            assert r.headers["retry-after"]
            seen.setdefault(r.status_code, []).append("GET token (IdM failing)")
        assert set(seen) >= {200, 201, 204, 401, 403, 404, 405, 413, 422, 500, 503}, seen

    def test_token_responses_are_not_cacheable(self, default: Deployment) -> None:
        client = client_key(default, ["acme"])
        with default.http() as http:
            r = http.get("/v1/teams/acme/token", headers=client)
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["pragma"] == "no-cache"

    def test_the_request_id_is_echoed_only_when_well_formed(self, default: Deployment) -> None:
        with default.http() as http:
            good = http.get("/healthz", headers={"X-Request-ID": "trace-123.abc_DEF"})
            bad = http.get("/healthz", headers={"X-Request-ID": "x" * 65})
            evil = http.get("/healthz", headers={"X-Request-ID": "a\tb<script>"})
        assert good.headers["x-request-id"] == "trace-123.abc_DEF"
        assert bad.headers["x-request-id"] != "x" * 65
        assert "<script>" not in evil.headers["x-request-id"]

    def test_uvicorn_answers_a_malformed_request_without_a_server_header(
        self, default: Deployment
    ) -> None:
        """Outside the application (no security headers are possible there), uvicorn itself
        must not announce itself either."""
        port = int(default.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer = sock.recv(4096).decode("latin-1").lower()
        assert answer.startswith("http/1.1 400")
        assert "\r\nserver:" not in answer


class TestCors:
    def test_closed_by_default(self, deployments: dict[str, Deployment]) -> None:
        with deployments["default"].http() as http:
            simple = http.get("/healthz", headers={"Origin": OK_ORIGIN})
            preflight = http.options(
                "/v1/teams",
                headers={"Origin": OK_ORIGIN, "Access-Control-Request-Method": "GET"},
            )
        for r in (simple, preflight):
            assert not any(h.startswith("access-control-") for h in r.headers), r.headers
            assert_hardened(r)
        assert preflight.status_code == 405

    def test_open_to_the_configured_origin_only(self, deployments: dict[str, Deployment]) -> None:
        with deployments["locked"].http() as http:
            ok = http.get("/healthz", headers={"Origin": OK_ORIGIN})
            evil = http.get("/healthz", headers={"Origin": EVIL_ORIGIN})
            ok_preflight = http.options(
                "/v1/teams/acme/token",
                headers={
                    "Origin": OK_ORIGIN,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            evil_preflight = http.options(
                "/v1/teams/acme/token",
                headers={"Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "GET"},
            )
        assert ok.headers["access-control-allow-origin"] == OK_ORIGIN
        assert "access-control-allow-origin" not in evil.headers
        assert ok_preflight.status_code == 200
        assert ok_preflight.headers["access-control-allow-origin"] == OK_ORIGIN
        assert "authorization" in ok_preflight.headers["access-control-allow-headers"].lower()
        assert evil_preflight.status_code == 400
        assert "access-control-allow-origin" not in evil_preflight.headers
        for r in (ok, evil, ok_preflight, evil_preflight):
            assert "access-control-allow-credentials" not in r.headers
            assert r.headers.get("access-control-allow-origin") != "*"
            assert_hardened(r)


class TestDocs:
    def test_the_docs_setting_removes_the_explorer_and_the_spec(
        self, deployments: dict[str, Deployment]
    ) -> None:
        paths = ("/docs", "/openapi.json", "/docs/static/swagger-ui.css")
        with deployments["default"].http() as http:
            assert [http.get(p).status_code for p in paths] == [200, 200, 200]
        with deployments["locked"].http() as http:
            answers = [http.get(p) for p in paths]
        assert [r.status_code for r in answers] == [404, 404, 404]
        for r in answers:
            assert_hardened(r)


class TestMethods:
    @pytest.mark.parametrize(
        "path", ["/v1/teams", "/v1/teams/acme", "/v1/teams/acme/token", "/healthz", "/oauth/token"]
    )
    def test_trace_is_refused(self, default: Deployment, path: str) -> None:
        with default.http() as http:
            r = http.request("TRACE", path, headers=default.admin)
        assert r.status_code == 405
        assert "TRACE" not in r.headers["allow"]
        assert_hardened(r)


class TestBodyLimit:
    def test_bodies_over_the_limit_get_413_by_content_length_and_chunked(
        self, default: Deployment
    ) -> None:
        admin = {**default.admin, "Content-Type": "application/json"}
        big = b'{"slug": "' + b"a" * MAX_BODY + b'"}'
        with default.http() as http:
            by_length = http.post("/v1/teams", content=big, headers=admin)
            chunks = [big[i : i + 1000] for i in range(0, len(big), 1000)]
            chunked = http.post("/v1/teams", content=iter(chunks), headers=admin)
            unauthenticated = http.post("/v1/teams", content=iter(chunks))
            oauth = http.post(
                "/oauth/token",
                content=iter(chunks),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            # At the limit: read and judged on its content (422: the slug is too long).
            at_limit = b'{"slug": "' + b"a" * (MAX_BODY - 12) + b'"}'
            assert len(at_limit) == MAX_BODY
            fits = http.post("/v1/teams", content=at_limit, headers=admin)
        assert by_length.request.headers.get("content-length") == str(len(big))
        assert chunked.request.headers.get("transfer-encoding") == "chunked"
        for r in (by_length, chunked, unauthenticated):
            assert r.status_code == 413, r.text
            assert r.json()["code"] == "payload-too-large"
            assert_hardened(r)
        assert oauth.status_code == 413  # the OAuth endpoint answers in RFC 6749 form
        assert fits.status_code == 422


class TestInputLimits:
    def test_over_long_parameters_get_422(self, default: Deployment) -> None:
        client = client_key(default, ["acme"])
        admin = default.admin
        long_slug, long_name = "a" * 64, "n" * 64
        cases: list[tuple[str, str, dict[str, object]]] = [
            ("GET", f"/v1/teams/{long_slug}", {"headers": admin}),
            ("POST", "/v1/teams", {"json": {"slug": long_slug}, "headers": admin}),
            ("GET", f"/v1/teams/{long_slug}/token", {"headers": client}),
            ("GET", f"/v1/teams/acme/credentials/{long_name}", {"headers": admin}),
            (
                "POST",
                "/v1/teams/acme/credentials",
                {
                    "json": {"name": long_name, "region": "eu", "api_token": "x" * 20},
                    "headers": admin,
                },
            ),
            (
                "POST",
                "/v1/teams/acme/credentials",
                {"json": {"region": "eu", "api_token": "x" * 4097}, "headers": admin},
            ),
            (
                "GET",
                "/v1/teams/acme/token",
                {"params": {"credential": long_name}, "headers": client},
            ),
            ("GET", "/v1/teams/acme/token", {"params": {"min_ttl": 3601}, "headers": client}),
            (
                "GET",
                "/v1/teams/acme/token",
                {"params": {"rejected_sha256": "a" * 63}, "headers": client},
            ),
            (
                "GET",
                "/v1/teams/acme/token",
                {"params": {"rejected_sha256": "a" * 65}, "headers": client},
            ),
            (
                "GET",
                "/v1/teams/acme/token",
                {"params": {"rejected_sha256": "g" * 64}, "headers": client},
            ),
            ("PATCH", "/v1/teams/acme", {"json": {"name": "x" * 201}, "headers": admin}),
            ("POST", "/v1/clients", {"json": {"name": "x" * 101, "teams": []}, "headers": admin}),
            ("GET", "/v1/audit-events", {"params": {"action": "a" * 64}, "headers": admin}),
            ("GET", "/v1/audit-events", {"params": {"team": long_slug}, "headers": admin}),
        ]
        for method, path, kwargs in cases:
            with default.http() as http:
                r = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert r.status_code == 422, f"{method} {path} {kwargs.get('params')}: {r.text}"
            assert r.json()["code"] == "validation-failed"
            assert_hardened(r)
        with default.http() as http:  # the bounds themselves are accepted
            ok = http.get(
                "/v1/teams/acme/token",
                params={"rejected_sha256": "a" * 64, "min_ttl": 3600},
                headers=client,
            )
        assert ok.status_code not in (413, 422), ok.text

    def test_a_422_names_no_input_not_even_an_unexpected_fields_name(
        self, default: Deployment
    ) -> None:
        secret = f"{ACCEPTED_PREFIX}pasted-in-the-wrong-place-{uuid.uuid4().hex}"
        with default.http() as http:
            r = http.post("/v1/teams", json={"slug": secret, secret: secret}, headers=default.admin)
        assert r.status_code == 422
        assert secret not in r.text
        assert {tuple(e["loc"]) for e in r.json()["errors"]} == {
            ("body", "slug"),
            ("body", "<unexpected field>"),
        }

    def test_lists_are_capped(self, default: Deployment) -> None:
        admin = default.admin
        lists = ["/v1/teams", "/v1/clients", "/v1/audit-events", "/v1/teams/acme/credentials"]
        with default.http() as http:
            for path in lists:
                too_many = http.get(path, params={"limit": 101}, headers=admin)
                assert too_many.status_code == 422, path
                assert http.get(path, params={"limit": 100}, headers=admin).status_code == 200
                far = http.get(path, params={"offset": 1_000_001}, headers=admin)
                assert far.status_code == 422, path
            grants = [f"team-{i}" for i in range(101)]
            created = http.post(
                "/v1/clients", json={"name": "many", "teams": grants}, headers=admin
            )
            assert created.status_code == 422
            fits = http.post(
                "/v1/clients", json={"name": "many", "teams": grants[:100]}, headers=admin
            )
            assert fits.status_code == 201, fits.text
            client_id = fits.json()["client"]["id"]
            patched = http.patch(f"/v1/clients/{client_id}", json={"teams": grants}, headers=admin)
            assert patched.status_code == 422
