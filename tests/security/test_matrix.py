"""The authorization matrix: every route x every kind of caller, on both backends.

For each route of the application (taken from the route inventory, so a new route without a row
here fails) and each caller, the expected answer: 401 with `WWW-Authenticate` for keys that do
not authenticate, 403 for clients on admin routes or teams they hold no grant for, success for
the granted client and the admin. Every refused request is checked to have:

- a problem+json body (RFC 6749 5.2 JSON on the OAuth endpoint) with the stable code;
- the same answer whether the target (team, credential, client) exists or not;
- caused zero upstream calls (the development IdM counts) and zero reads of the JWT cache, the
  credential directory or the broker (counting wrappers on the app's own objects);
- changed nothing (admin views of every team, credential and client before and after).

Run with `-s` to see the matrix.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Mount

from app.auth.keys import issue_key
from app.integrations.phrase.dev_idm import ACCEPTED_PREFIX
from tests.conftest import Api, Env
from tests.security import settled_app  # noqa: F401 - a fixture, used through pytestmark
from tests.security.test_inventory import inventory

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_KEY_TYPE = "urn:tokenvend:params:oauth:token-type:client_key"

CALLERS = [
    "none",
    "malformed",
    "unknown",
    "disabled",
    "deleted",
    "rotated",
    "other-team",
    "client(*)",
    "granted",
    "admin",
]
UNAUTHENTICATED = {"none", "malformed", "unknown", "disabled", "deleted", "rotated"}

pytestmark = pytest.mark.usefixtures("settled_app")


@dataclass(frozen=True)
class Ids:
    team: str
    name: str
    client_id: str


Body = Callable[[Ids, str], dict[str, Any] | None]


@dataclass(frozen=True)
class Case:
    """How to call one route, and what its success looks like."""

    admin_only: bool
    ok: int
    body: Body = field(default=lambda ids, fresh: None)
    query: Callable[[Ids], dict[str, str]] = field(default=lambda ids: {})

    @staticmethod
    def has_ids(template: str) -> bool:
        return "{" in template


def _token() -> str:
    return f"{ACCEPTED_PREFIX}{uuid.uuid4().hex}"


# Refused callers send bodies that would do harm if they got through: escalations, new keys, new
# API tokens, deletions.
CASES: dict[tuple[str, str], Case] = {
    ("POST", "/v1/teams"): Case(True, 201, body=lambda ids, fresh: {"slug": fresh}),
    ("GET", "/v1/teams"): Case(True, 200),
    ("GET", "/v1/teams/{team}"): Case(True, 200),
    ("PATCH", "/v1/teams/{team}"): Case(True, 200, body=lambda ids, fresh: {"name": "Pwned"}),
    ("DELETE", "/v1/teams/{team}"): Case(True, 204),
    ("POST", "/v1/teams/{team}/credentials"): Case(
        True, 201, body=lambda ids, fresh: {"name": fresh, "region": "eu", "api_token": _token()}
    ),
    ("GET", "/v1/teams/{team}/credentials"): Case(True, 200),
    ("GET", "/v1/teams/{team}/credentials/{name}"): Case(True, 200),
    ("PATCH", "/v1/teams/{team}/credentials/{name}"): Case(
        True, 200, body=lambda ids, fresh: {"status": "disabled"}
    ),
    ("DELETE", "/v1/teams/{team}/credentials/{name}"): Case(True, 204),
    ("PUT", "/v1/teams/{team}/credentials/{name}/api-token"): Case(
        True, 200, body=lambda ids, fresh: {"api_token": _token()}
    ),
    ("GET", "/v1/teams/{team}/token"): Case(False, 200, query=lambda ids: {"credential": ids.name}),
    ("DELETE", "/v1/teams/{team}/token"): Case(
        True, 200, query=lambda ids: {"credential": ids.name}
    ),
    ("POST", "/v1/clients"): Case(
        True, 201, body=lambda ids, fresh: {"name": fresh, "role": "admin", "teams": ["*"]}
    ),
    ("GET", "/v1/clients"): Case(True, 200),
    ("GET", "/v1/clients/{client_id}"): Case(True, 200),
    ("PATCH", "/v1/clients/{client_id}"): Case(
        True, 200, body=lambda ids, fresh: {"role": "admin", "teams": ["*"], "disabled": False}
    ),
    ("POST", "/v1/clients/{client_id}/rotate-key"): Case(True, 200),
    ("DELETE", "/v1/clients/{client_id}"): Case(True, 204),
    ("GET", "/v1/audit-events"): Case(True, 200),
}
OAUTH = ("POST", "/oauth/token")
# Public: every caller gets the same 200, whatever it sends in Authorization.
PUBLIC = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/docs/static/{path}"),
]
PUBLIC_URLS = {"/docs/static/{path}": "/docs/static/swagger-ui.css"}


@dataclass
class Caller:
    name: str
    key: str | None  # the API key, or what is sent in its place

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.key is None else {"Authorization": f"Bearer {self.key}"}


@dataclass
class Probe:
    """Counts what a refused request must not touch."""

    calls: Counter[str] = field(default_factory=Counter)

    def wrap(self, monkeypatch: pytest.MonkeyPatch, obj: object, name: str, label: str) -> None:
        original = getattr(obj, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[label] += 1
            return await original(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: Any

    @classmethod
    def of(cls, r: httpx.Response) -> Answer:
        ctype = r.headers.get("content-type", "")
        body = r.json() if "json" in ctype and r.content else r.text
        return cls(r.status_code, r.headers, body)


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


class Matrix:
    def __init__(
        self, app: FastAPI, http: httpx.AsyncClient, api: Api, env: Env, probe: Probe
    ) -> None:
        self.app = app
        self.http = http
        self.api = api
        self.env = env
        self.probe = probe
        self.callers: dict[str, Caller] = {}
        self.cells: dict[tuple[str, str], dict[str, str]] = {}
        self.serial = 0

    def fresh(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}-{self.serial}"

    async def setup(self) -> tuple[Ids, Ids]:
        api, http = self.api, self.http
        for team in ("acme", "other"):
            await api.team(team)
            await api.credential(team)
        victim_id, _ = await api.client(["acme"])

        async def client(teams: list[str]) -> tuple[str, str]:
            client_id, headers = await api.client(teams)
            return client_id, key_of(headers)

        disabled_id, disabled = await client(["acme"])
        r = await http.patch(
            f"/v1/clients/{disabled_id}", json={"disabled": True}, headers=api.admin
        )
        assert r.status_code == 200, r.text
        deleted_id, deleted = await client(["acme"])
        r = await http.delete(f"/v1/clients/{deleted_id}", headers=api.admin)
        assert r.status_code == 204, r.text
        rotated_id, rotated = await client(["acme"])
        r = await http.post(f"/v1/clients/{rotated_id}/rotate-key", headers=api.admin)
        assert r.status_code == 200, r.text
        assert r.json()["api_key"] != rotated
        keys = {
            "none": None,
            "malformed": "not-a-key",
            "unknown": issue_key().key.get_secret_value(),
            "disabled": disabled,
            "deleted": deleted,
            "rotated": rotated,
            "other-team": (await client(["other"]))[1],
            "client(*)": (await client(["*"]))[1],
            "granted": (await client(["acme"]))[1],
            "admin": self.env.admin_key,
        }
        self.callers = {name: Caller(name, keys[name]) for name in CALLERS}
        real = Ids("acme", "default", victim_id)
        missing = Ids("ghost", "nope", str(uuid.uuid4()))
        return real, missing

    async def sandbox(self) -> Ids:
        """Disposable targets for a successful (mutating) call."""
        team = self.fresh("sandbox")
        await self.api.team(team)
        await self.api.credential(team)
        client_id, _ = await self.api.client([team])
        return Ids(team, "default", client_id)

    # --- requests ------------------------------------------------------------------------------

    async def call(self, route: tuple[str, str], caller: Caller, ids: Ids) -> Answer:
        method, template = route
        if route == OAUTH:
            return await self.oauth(caller, ids)
        case = CASES[route]
        path = template.format(team=ids.team, name=ids.name, client_id=ids.client_id)
        body = case.body(ids, self.fresh("made-by" if caller.name == "admin" else "intruder"))
        r = await self.http.request(
            method, path, params=case.query(ids), json=body, headers=caller.headers
        )
        return Answer.of(r)

    async def oauth(self, caller: Caller, ids: Ids) -> Answer:
        form = {"audience": ids.team, "credential": ids.name}
        if caller.key is None:
            form["grant_type"] = "client_credentials"  # and no client authentication at all
        else:
            form |= {
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": caller.key,
                "subject_token_type": CLIENT_KEY_TYPE,
            }
        return Answer.of(await self.http.post("/oauth/token", data=form))

    async def snapshot(self) -> dict[str, Any]:
        """What the admin sees of every team, credential and client."""
        admin = self.api.admin
        seen: dict[str, Any] = {}
        teams = (await self.http.get("/v1/teams?limit=100", headers=admin)).json()["items"]
        seen["teams"] = teams
        for team in teams:
            path = f"/v1/teams/{team['slug']}/credentials?limit=100"
            seen[team["slug"]] = (await self.http.get(path, headers=admin)).json()["items"]
        seen["clients"] = (await self.http.get("/v1/clients?limit=100", headers=admin)).json()
        return seen

    async def use_every_key(self) -> None:
        """A valid key refused on a route it may not use was still used: authenticating notes
        `last_used_at` (and, through the model's `onupdate`, `updated_at`) at most once a minute.
        Using every key once before the first snapshot keeps that out of the comparison, so the
        snapshots can compare every field."""
        for caller in self.callers.values():
            await self.http.get("/v1/teams", headers=caller.headers)

    # --- expectations --------------------------------------------------------------------------

    def expected_refusal(self, route: tuple[str, str], caller: str) -> tuple[int, str] | None:
        """(status, code) for a refused caller on the real target, None if it may proceed."""
        if route == OAUTH:
            if caller in UNAUTHENTICATED:
                return 401, "invalid_client"
            return (400, "invalid_target") if caller == "other-team" else None
        if caller in UNAUTHENTICATED:
            return 401, "unauthenticated"
        if caller == "admin":
            return None
        if CASES[route].admin_only:
            return 403, "forbidden"
        return (403, "team-not-granted") if caller == "other-team" else None

    def check_refusal(self, route: tuple[str, str], answer: Answer, status: int, code: str) -> None:
        where = f"{route} -> {answer.status} {answer.body}"
        assert answer.status == status, where
        if route == OAUTH:
            assert answer.headers["content-type"] == "application/json", where
            assert answer.body["error"] == code, where
            assert answer.headers["cache-control"] == "no-store", where
            if status == 401:
                assert answer.headers["www-authenticate"].startswith("Basic"), where
            return
        assert answer.headers["content-type"] == "application/problem+json", where
        body = answer.body
        assert set(body) >= {"type", "title", "status", "detail", "code", "request_id"}, where
        assert (body["status"], body["code"]) == (status, code), where
        assert body["type"].endswith(f"/{code}"), where
        assert body["request_id"] == answer.headers["x-request-id"], where
        if status == 401:
            assert answer.headers["www-authenticate"].startswith("Bearer"), where
        else:
            assert "www-authenticate" not in answer.headers, where

    @staticmethod
    def comparable(answer: Answer, ids: Ids) -> tuple[Any, ...]:
        """An answer with the request's own ids and request id taken out."""
        body = answer.body
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "request_id"}
        text = repr(body)
        for value, placeholder in (
            (ids.client_id, "{client_id}"),
            (ids.team, "{team}"),
            (ids.name, "{name}"),
        ):
            text = text.replace(f"'{value}'", placeholder).replace(value, placeholder)
        headers = {
            k: answer.headers.get(k)
            for k in ("content-type", "www-authenticate", "cache-control", "retry-after")
        }
        return answer.status, headers, text

    # --- the two phases ------------------------------------------------------------------------

    async def refused_phase(self, real: Ids, missing: Ids) -> int:
        refused = 0
        for route in [*CASES, OAUTH]:
            for caller in CALLERS:
                expected = self.expected_refusal(route, caller)
                if expected is None:
                    continue
                answers = []
                for ids in (real, missing):
                    before = (self.env.idm.requests, dict(self.probe.calls))
                    answer = await self.call(route, self.callers[caller], ids)
                    after = (self.env.idm.requests, dict(self.probe.calls))
                    assert after == before, f"{route} by {caller}: touched {before} -> {after}"
                    self.check_refusal(route, answer, *expected)
                    answers.append(answer)
                    refused += 1
                assert self.comparable(answers[0], real) == self.comparable(answers[1], missing), (
                    f"{route} by {caller}: the answer depends on whether the target exists"
                )
                self.cells.setdefault(route, {})[caller] = str(expected[0])
        return refused

    async def success_phase(self, real: Ids, missing: Ids) -> None:
        for route in [*CASES, OAUTH]:
            for caller in CALLERS:
                if self.expected_refusal(route, caller) is not None:
                    continue
                case_ok = 200 if route == OAUTH else CASES[route].ok
                # Mutations by the admin run on a disposable sandbox; the rest on the real target.
                target = real if caller != "admin" or route[0] == "GET" else await self.sandbox()
                first = await self.call(route, self.callers[caller], target)
                assert first.status == case_ok, f"{route} by {caller}: {first.body}"
                second = await self.call(route, self.callers[caller], missing)
                expected_missing = self.expected_on_missing(route, caller, case_ok)
                assert second.status == expected_missing, f"{route} by {caller}: {second.body}"
                cell = str(first.status)
                if second.status != first.status:
                    cell += f"/{second.status}"
                self.cells.setdefault(route, {})[caller] = cell

    @staticmethod
    def expected_on_missing(route: tuple[str, str], caller: str, ok: int) -> int:
        if route == OAUTH:
            return 400  # invalid_target: no grant for, or no such, team
        if not Case.has_ids(route[1]):
            return ok
        if caller == "granted":
            return 403  # the missing team is one it holds no grant for
        return 404

    async def public_phase(self) -> None:
        for route in PUBLIC:
            url = PUBLIC_URLS.get(route[1], route[1])
            for caller in CALLERS:
                r = await self.http.request(route[0], url, headers=self.callers[caller].headers)
                assert r.status_code == 200, f"{route} by {caller}: {r.status_code}"
                self.cells.setdefault(route, {})[caller] = "200"

    def table(self, backend: str) -> str:
        rows = [*CASES, OAUTH, *PUBLIC]
        labels = [f"{m} {p}" for m, p in rows]
        width = max(map(len, labels))
        widths = [max(len(c), 7) for c in CALLERS]
        columns = list(zip(CALLERS, widths, strict=True))
        head = " | ".join([f"{'route':<{width}}", *(f"{c:<{w}}" for c, w in columns)])
        lines = [f"authorization matrix ({backend}); cells: real target[/missing target]", head]
        lines.append("-" * len(head))
        for label, route in zip(labels, rows, strict=True):
            cells = self.cells[route]
            lines.append(
                " | ".join([f"{label:<{width}}", *(f"{cells[c]:<{w}}" for c, w in columns)])
            )
        return "\n".join(lines)


def changes(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two snapshots differ, as paths, for the assertion message."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [c for k in keys for c in changes(before.get(k), after.get(k), f"{path}.{k}")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [c for i, (b, a) in pairs for c in changes(b, a, f"{path}[{i}]")]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def routes_of(app: FastAPI) -> set[tuple[str, str]]:
    found = set()
    for entry in inventory(app):
        if isinstance(entry.route, Mount):
            found.add(("GET", f"{entry.path}/{{path}}"))
            continue
        found |= {(m, entry.path) for m in entry.methods}
    return found


@pytest.fixture
def probe(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Probe:
    infra = app.state.infra
    probe = Probe()
    for name in ("get", "get_shared", "expires_at"):
        probe.wrap(monkeypatch, infra.cache, name, f"cache.{name}")
    probe.wrap(monkeypatch, infra.broker, "vend", "broker.vend")
    probe.wrap(monkeypatch, infra.directory, "find", "directory.find")
    return probe


class TestAuthorizationMatrix:
    async def test_every_route_refuses_every_caller_it_must_and_serves_the_rest(
        self, app: FastAPI, http: httpx.AsyncClient, api: Api, env: Env, probe: Probe
    ) -> None:
        covered = {*CASES, OAUTH, *PUBLIC}
        assert routes_of(app) == covered, "every route needs a row in the matrix"

        matrix = Matrix(app, http, api, env, probe)
        real, missing = await matrix.setup()
        await matrix.use_every_key()
        before = await matrix.snapshot()
        idm_before = env.idm.requests

        refused = await matrix.refused_phase(real, missing)

        after = await matrix.snapshot()
        assert after == before, f"a refused request changed something: {changes(before, after)}"
        assert env.idm.requests == idm_before
        assert refused > 300

        await matrix.public_phase()
        # The counters see what a permitted vend does, so a refused one that read the cache
        # would have been seen too.
        calls_before = probe.calls["cache.get"]
        await matrix.success_phase(real, missing)
        assert probe.calls["cache.get"] > calls_before
        assert env.idm.requests > idm_before

        print(f"\n{matrix.table(env.backend)}\nrefused requests checked: {refused}")

    async def test_refusals_are_audited_without_the_presented_key(
        self, http: httpx.AsyncClient, api: Api, app: FastAPI
    ) -> None:
        await api.team("acme")
        _, other = await api.client(["other"])
        unknown = issue_key().key.get_secret_value()
        await http.get("/v1/teams/acme/token", headers=other)
        await http.get("/v1/teams", headers=other)
        await http.get("/v1/teams", headers={"Authorization": f"Bearer {unknown}"})

        r = await http.get("/v1/audit-events", params={"action": "auth.denied"}, headers=api.admin)

        events = r.json()["items"]
        assert sorted(e["outcome"] for e in events) == [
            "forbidden",
            "team-not-granted",
            "unauthenticated",
        ]
        assert unknown not in r.text
        assert key_of(other) not in r.text
        by_outcome = {e["outcome"]: e for e in events}
        assert by_outcome["team-not-granted"]["team"] == "acme"
        assert all(e["request_id"] and e["remote_addr"] for e in events)
