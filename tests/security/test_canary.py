"""The canary test: no secret reaches a log, a response, the database or Redis.

A real `tokenvend serve` (debug logs, JSON, stdout and stderr captured to files) runs on
PostgreSQL (through a TCP proxy the test can cut) and a Redis the test owns (and kills). Every
secret it handles is a canary, a distinctive value the test knows:

- the Phrase API tokens stored (`phrdev_CANARY...`, accepted by the development IdM), one
  rejected by the IdM, and values only ever sent inside invalid requests;
- the client keys (issued through the API) and the bootstrap admin key;
- every JWT the development IdM signed, vended or not;
- the encryption key, the database password, the Redis password and the webhook secret.

Every flow runs, error paths included: 422s with canaries in bodies, paths, queries and field
names; 401s with an API token presented as a key; upstream 5xx, 429, garbage, redirects, timeouts
and `invalid_grant`; Redis killed and back; PostgreSQL refused, hung and back. Then the captured
logs, every response (status line, headers, body), a `pg_dump` and a dump of every Redis key and
value are searched for each canary: raw, base64 (standard and URL-safe, with and without padding,
at the three alignments a value can have inside a longer base64 text), URL-encoded and hex.
The only hits allowed are the ones the API exists to return: a client key in the one response
that issued it, a JWT in the token response that vended it. Run with `-s` for the summary.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from redis import Redis as SyncRedis

from app.auth.keys import issue_key
from app.cli import upgrade_database
from app.core.crypto import KEY_BYTES
from app.integrations.phrase.dev_idm import DevIdm, DevIdmMode, create_dev_idm_app
from tests.fixtures.services import (
    asyncpg_url,
    fresh_database,
    require_redis,
)
from tests.support.processes import RedisServer, TokenvendServer, require_binary
from tests.support.servers import ServerThread
from tests.support.tcp_proxy import TcpProxy

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CLIENT_KEY_TYPE = "urn:tokenvend:params:oauth:token-type:client_key"


# --- canaries and the search ------------------------------------------------------------------


def variants(secret: bytes) -> dict[bytes, str]:
    """Every form in which `secret` could appear, each named."""
    found: dict[bytes, str] = {secret: "raw"}
    for kind, encode in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
        whole = encode(secret)
        found.setdefault(whole, kind)
        found.setdefault(whole.rstrip(b"="), f"{kind}-unpadded")
        # Inside a longer encoded text the secret starts at one of three byte offsets modulo 3;
        # from the next group boundary on its encoding is fixed, whatever surrounds it.
        for offset in range(3):
            core = secret[offset:]
            core = core[: len(core) - len(core) % 3]
            if len(core) >= 12:
                found.setdefault(encode(core), f"{kind}@{offset}")
    try:
        text = secret.decode()
    except UnicodeDecodeError:
        pass
    else:
        found.setdefault(quote(text, safe="").encode(), "url")
        found.setdefault(quote_plus(text).encode(), "url+")
    found.setdefault(secret.hex().encode(), "hex")
    return found


@dataclass
class Canaries:
    values: dict[str, bytes] = field(default_factory=dict)

    def add(self, name: str, value: str | bytes) -> str:
        raw = value.encode() if isinstance(value, str) else value
        assert len(raw) >= 16, f"{name}: a canary must be distinctive"
        self.values[name] = raw
        return name

    def hits(self, data: bytes) -> list[tuple[str, str]]:
        """(canary, form) for each canary found in `data`."""
        found = []
        for name, secret in self.values.items():
            for needle, kind in variants(secret).items():
                if needle in data:
                    found.append((name, kind))
                    break
        return found


@dataclass
class Place:
    name: str
    data: bytes
    allowed: frozenset[str] = frozenset()
    items: int = 1  # lines, keys, ...


def raw_response(r: httpx.Response) -> bytes:
    head = f"HTTP/1.1 {r.status_code} {r.reason_phrase}\r\n".encode()
    head += b"".join(k + b": " + v + b"\r\n" for k, v in r.headers.raw)
    return head + b"\r\n" + r.content


# --- the pieces of the system -------------------------------------------------------------------


class RecordingIdm(DevIdm):
    """The development IdM, remembering every JWT it signs (each one a canary)."""

    def __init__(self) -> None:
        super().__init__()
        self.signed: list[str] = []

    def _sign(self, api_token: str, expires_in: int) -> str:
        token = super()._sign(api_token, expires_in)
        self.signed.append(token)
        return token


class CapturedServer(TokenvendServer):
    """`tokenvend serve` with stdout and stderr in files of their own."""

    def __init__(self, workdir: Path, env: Mapping[str, str]) -> None:
        super().__init__(workdir, env, name="canary")
        self.stdout_path = workdir / "canary.stdout"
        self.stderr_path = workdir / "canary.stderr"
        self.log_path = self.stderr_path  # what log_tail() shows when startup fails
        self._files: list[IO[bytes]] = []

    def _spawn(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        out, err = self.stdout_path.open("ab"), self.stderr_path.open("ab")
        self._files += [out, err]
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )

    def stop(self, grace: float = 10.0) -> None:
        super().stop(grace)
        for f in self._files:
            f.close()
        self._files.clear()


class PasswordRedis(RedisServer):
    """A test-owned redis-server that requires a password (set once it answers)."""

    def __init__(self, workdir: Path, password: str) -> None:
        super().__init__(workdir)
        self.password = password

    def start(self, timeout: float = 10.0) -> None:
        super().start(timeout)
        with SyncRedis(host="127.0.0.1", port=self.port) as plain:
            plain.config_set("requirepass", self.password)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> SyncRedis:
        return SyncRedis(host="127.0.0.1", port=self.port, password=self.password)

    def dump(self) -> bytes:
        """Every key with its value, whatever its type."""
        parts: list[bytes] = []
        with self.client() as redis:
            for key in redis.scan_iter(count=1000):
                kind = redis.type(key)
                parts.append(b"KEY " + key)
                if kind == b"string":
                    parts.append(redis.get(key) or b"")
                elif kind == b"hash":
                    for k, v in redis.hgetall(key).items():
                        parts += [k, v]
                elif kind == b"zset":
                    for member, score in redis.zrange(key, 0, -1, withscores=True):
                        parts += [member, repr(score).encode()]
                elif kind == b"set":
                    parts += list(redis.smembers(key))
                elif kind == b"list":
                    parts += list(redis.lrange(key, 0, -1))
                else:
                    parts.append(b"TYPE " + kind)
        return b"\n".join(parts)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tokenvend-canary-") as path:
        yield Path(path)


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh migrated PostgreSQL database for this module: its dump holds only what this test
    did."""
    require_binary("pg_dump")
    with fresh_database("canary") as name:
        upgrade_database(asyncpg_url(name))
        yield name


@pytest.fixture(scope="module")
def recording_idm() -> Iterator[tuple[RecordingIdm, str]]:
    idm = RecordingIdm()
    with ServerThread(create_dev_idm_app(idm)) as server:
        yield idm, server.url


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    mark: str
    api_token: str
    rotated_token: str
    spare_token: str
    rejected_token: str  # no `phrdev_` prefix: the IdM answers invalid_grant
    outage_token: str  # sent while the database is down: never stored
    invalid: str  # only ever sent inside invalid requests
    db_password: str
    redis_password: str
    webhook_secret: str
    admin_key: str
    encryption_key: bytes

    @classmethod
    def make(cls) -> Secrets:
        mark = secrets.token_hex(8)
        return cls(
            mark=mark,
            api_token=f"phrdev_CANARYapitoken{mark}",
            rotated_token=f"phrdev_CANARYrotatedtoken{mark}",
            spare_token=f"phrdev_CANARYsparetoken{mark}",
            rejected_token=f"CANARYrejectedtoken{mark}",
            outage_token=f"phrdev_CANARYoutagetoken{mark}",
            invalid=f"phrdev_CANARYinvalidinput{mark}",
            db_password=f"CANARYdbpassword{mark}",
            redis_password=f"CANARYredispassword{mark}",
            webhook_secret=f"CANARYwebhooksecret{mark}",
            admin_key=issue_key().key.get_secret_value(),
            encryption_key=(b"CANARYencryptionkey" + secrets.token_bytes(KEY_BYTES))[:KEY_BYTES],
        )

    def canaries(self) -> Canaries:
        canaries = Canaries()
        for name, value in vars(self).items():
            if name != "mark":
                canaries.add(name.replace("_", "-"), value)
        return canaries


def jwt_name(token: str) -> str:
    return f"jwt-{hashlib.sha256(token.encode()).hexdigest()[:12]}"


class Run:
    """The client side: every response kept with the canaries it may legitimately hold."""

    def __init__(self, base_url: str, idm: RecordingIdm, admin_key: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=15.0)
        self.idm = idm
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.responses: list[tuple[str, httpx.Response, frozenset[str]]] = []
        self.vended: list[str] = []

    def call(
        self,
        label: str,
        method: str,
        url: str,
        *,
        expect: int | tuple[int, ...] | None = None,
        allow: frozenset[str] = frozenset(),
        **kwargs: Any,
    ) -> httpx.Response:
        r = self.http.request(method, url, **kwargs)
        body = r.json() if r.headers.get("content-type") == "application/json" else None
        if r.status_code == 200 and isinstance(body, dict) and "access_token" in body:
            token = body["access_token"]
            # The JWT this response exists to hand out: one the IdM signed.
            assert token in self.idm.signed, f"{label}: a JWT the IdM never signed"
            allow = allow | {jwt_name(token)}
            self.vended.append(token)
        self.responses.append((label, r, allow))
        if expect is not None:
            wanted = expect if isinstance(expect, tuple) else (expect,)
            assert r.status_code in wanted, f"{label}: {r.status_code} {r.text[:300]}"
        return r

    def close(self) -> None:
        self.http.close()

    def ready(self, status: str) -> bool:
        r = self.http.get("/readyz")  # not kept: polled, and the last one is kept below
        return r.status_code == 200 and r.json().get("status") == status


def wait_for(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def exercise(
    run: Run,
    idm: RecordingIdm,
    redis: PasswordRedis,
    proxy: TcpProxy,
    s: Secrets,
    canaries: Canaries,
) -> bytes:
    """Every flow, error paths included. Returns the Redis dump taken before Redis is killed."""
    admin = run.admin
    token_url = "/v1/teams/canary/token"
    creds_url = "/v1/teams/canary/credentials"

    # Public routes.
    for url in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        run.call(f"GET {url}", "GET", url, expect=200)

    # Admin setup.
    run.call("create team", "POST", "/v1/teams", json={"slug": "canary"}, headers=admin, expect=201)
    for name, region, token in (
        ("default", "eu", s.api_token),
        ("spare", "eu", s.spare_token),
        ("revoked", "us", s.rejected_token),
    ):
        body = {"name": name, "region": region, "api_token": token}
        run.call(
            f"create credential {name}", "POST", creds_url, json=body, headers=admin, expect=201
        )
    run.call("list credentials", "GET", creds_url, headers=admin, expect=200)
    run.call("get credential", "GET", f"{creds_url}/default", headers=admin, expect=200)
    run.call(
        "label credential",
        "PATCH",
        f"{creds_url}/default",
        json={"product": "strings"},
        headers=admin,
        expect=200,
    )
    created = run.call(
        "create client",
        "POST",
        "/v1/clients",
        json={"name": "canary-svc", "teams": ["canary"]},
        headers=admin,
        expect=201,
        allow=frozenset({"client-key"}),
    )
    first_key = created.json()["api_key"]
    canaries.add("client-key", first_key)
    client_id = created.json()["client"]["id"]
    rotated = run.call(
        "rotate client key",
        "POST",
        f"/v1/clients/{client_id}/rotate-key",
        headers=admin,
        expect=200,
        allow=frozenset({"client-key-2"}),
    )
    key = rotated.json()["api_key"]
    canaries.add("client-key-2", key)
    client = bearer(key)
    run.call("rotated-away key", "GET", token_url, headers=bearer(first_key), expect=401)
    run.call("list clients", "GET", "/v1/clients", headers=admin, expect=200)

    # Vends: REST, targeted refresh, OAuth (three ways of client authentication).
    first = run.call("vend (miss)", "GET", token_url, headers=client, expect=200)
    run.call("vend (hit)", "GET", token_url, headers=client, expect=200)
    run.call(
        "vend spare", "GET", token_url, params={"credential": "spare"}, headers=client, expect=200
    )
    refused = hashlib.sha256(first.json()["access_token"].encode()).hexdigest()
    run.call(
        "vend replacing a refused JWT",
        "GET",
        token_url,
        params={"rejected_sha256": refused},
        headers=client,
        expect=200,
    )
    exchange = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": key,
        "subject_token_type": CLIENT_KEY_TYPE,
        "audience": "canary",
    }
    key_id = key.split("_", 2)[1]
    run.call("oauth token exchange", "POST", "/oauth/token", data=exchange, expect=200)
    credentials = {"grant_type": "client_credentials", "audience": "canary"}
    run.call(
        "oauth basic", "POST", "/oauth/token", data=credentials, auth=(key_id, key), expect=200
    )
    post = {**credentials, "client_id": key_id, "client_secret": key}
    run.call("oauth client_secret_post", "POST", "/oauth/token", data=post, expect=200)
    for label, form, headers, status in (
        ("oauth: API token as subject", {**exchange, "subject_token": s.api_token}, {}, 401),
        ("oauth: secret in scope", {**exchange, "scope": s.invalid}, {}, 400),
        ("oauth: secret as audience", {**exchange, "audience": s.invalid}, {}, 400),
        ("oauth: secret as grant type", {"grant_type": s.invalid}, {}, 400),
        ("oauth: secret as min_ttl", {**exchange, "min_ttl": s.invalid}, {}, 400),
        ("oauth: wrong client_id", {**post, "client_id": s.invalid}, {}, 401),
        (
            "oauth: malformed basic",
            credentials,
            {"Authorization": f"Basic {base64.b64encode(s.invalid.encode()).decode()}"},
            401,
        ),
        (
            "oauth: API token as basic password",
            credentials,
            {"Authorization": "Basic " + base64.b64encode(f"x:{s.api_token}".encode()).decode()},
            401,
        ),
    ):
        run.call(label, "POST", "/oauth/token", data=form, headers=headers, expect=status)

    # Rotation of the API token, then a credential Phrase refuses (424, negative cache, webhook).
    run.call(
        "rotate API token",
        "PUT",
        f"{creds_url}/default/api-token",
        json={"api_token": s.rotated_token},
        headers=admin,
        expect=200,
    )
    run.call("vend after rotation", "GET", token_url, headers=client, expect=200)
    revoked = {"credential": "revoked"}
    run.call("vend rejected", "GET", token_url, params=revoked, headers=client, expect=424)
    run.call("vend rejected (cached)", "GET", token_url, params=revoked, headers=client, expect=424)
    run.call("view rejected", "GET", f"{creds_url}/revoked", headers=admin, expect=200)

    # Upstream failures: every mode of the development IdM, each on a cold cache.
    for label, mode, status in (
        ("503", DevIdmMode(fail_status=503), 503),
        ("500", DevIdmMode(fail_status=500), 503),
        ("429", DevIdmMode(fail_status=429, retry_after=1), 503),
        ("html", DevIdmMode(garbage="html"), 502),
        ("huge body", DevIdmMode(garbage="huge"), 502),
        ("missing fields", DevIdmMode(garbage="missing-fields"), 502),
        ("bad expires_in", DevIdmMode(garbage="bad-expires"), 502),
        ("redirect", DevIdmMode(garbage="redirect"), 502),
        ("slow", DevIdmMode(delay_ms=1500), 504),
    ):
        idm.set_mode(mode)
        run.call(f"evict before upstream {label}", "DELETE", token_url, headers=admin, expect=200)
        run.call(f"vend, upstream {label}", "GET", token_url, headers=client, expect=status)
    idm.set_mode(DevIdmMode())
    run.call("vend, upstream recovered", "GET", token_url, headers=client, expect=200)

    # Invalid input carrying a canary: bodies, field names, paths, queries, headers.
    bad = s.invalid
    for method, url, body in (
        ("POST", "/v1/teams", {"slug": bad}),
        ("POST", "/v1/teams", {"slug": "fine", bad: bad}),
        ("POST", creds_url, {"name": bad, "region": "eu", "api_token": bad}),
        ("POST", creds_url, {"region": bad, "api_token": bad}),
        ("POST", creds_url, {"region": "eu", "api_token": bad, "expires_on": bad}),
        ("POST", creds_url, {"region": "eu", "api_token": [bad]}),
        ("POST", creds_url, {"region": "eu", "api_token": {bad: bad}}),
        ("POST", creds_url, {"region": "eu", "api_token": bad, "product": bad * 3}),
        ("PUT", f"{creds_url}/default/api-token", {"api_token": bad, "expires_on": bad}),
        ("PUT", f"{creds_url}/default/api-token", {"api_token": 12345, bad: 1}),
        ("PATCH", f"{creds_url}/default", {"status": bad}),
        ("PATCH", "/v1/teams/canary", {"name": bad * 6}),
        ("POST", "/v1/clients", {"name": "x", "teams": [bad]}),
        ("POST", "/v1/clients", {"name": "x", "role": bad}),
        ("POST", "/v1/clients", {"name": bad * 3, "rate_limit_per_second": bad}),
        ("PATCH", f"/v1/clients/{client_id}", {"teams": bad}),
    ):
        run.call(f"422 {method} {url}", method, url, json=body, headers=admin, expect=422)
    for label, content, ctype in (
        ("unterminated JSON", '{"api_token": "' + bad, "application/json"),
        ("form body", f"api_token={bad}&region=eu", "application/x-www-form-urlencoded"),
        ("text body", bad, "text/plain"),
    ):
        run.call(
            f"422 {label}",
            "POST",
            creds_url,
            content=content,
            headers={**admin, "Content-Type": ctype},
            expect=422,
        )
    for label, url, params in (
        ("credential query", token_url, {"credential": bad}),
        ("min_ttl query", token_url, {"min_ttl": bad}),
        ("rejected_sha256 query", token_url, {"rejected_sha256": bad}),
        ("team path", f"/v1/teams/{bad}/token", {}),
    ):
        run.call(f"422 {label}", "GET", url, params=params, headers=client, expect=422)
    for label, url, params in (
        ("credential path", f"{creds_url}/{bad}", {}),
        ("client id path", f"/v1/clients/{bad}", {}),
        ("audit filters", "/v1/audit-events", {"client_id": bad, "since": bad, "action": bad}),
        ("audit team", "/v1/audit-events", {"team": bad}),
        ("limit", "/v1/teams", {"limit": bad}),
    ):
        run.call(f"422 {label}", "GET", url, params=params, headers=admin, expect=422)
    for label, headers in (
        ("API token as bearer", bearer(s.api_token)),
        ("API token without scheme", {"Authorization": s.api_token}),
        (
            "API token in basic",
            {"Authorization": "Basic " + base64.b64encode(f"a:{s.api_token}".encode()).decode()},
        ),
        ("client key with a typo", bearer(key[:-1] + ("A" if key[-1] != "A" else "B"))),
    ):
        run.call(f"401 {label}", "GET", token_url, headers=headers, expect=401)
    run.call(
        "invalid request id",
        "GET",
        "/v1/teams",
        headers={**admin, "X-Request-ID": f"id with spaces {bad}"},
        expect=200,
    )
    run.call("404 unknown path", "GET", f"/v1/{bad}", headers=admin, expect=404)
    run.call("405 TRACE", "TRACE", "/v1/teams", headers=admin, expect=405)
    big = {"region": "eu", "api_token": bad * 200}
    run.call("413 content-length", "POST", creds_url, json=big, headers=admin, expect=413)
    run.call(
        "413 chunked",
        "POST",
        creds_url,
        content=iter([b'{"region": "eu", "api_token": "', bad.encode() * 200, b'"}']),
        headers={**admin, "Content-Type": "application/json"},
        expect=413,
    )

    # Redis killed: vends go on from process memory and the database; then Redis comes back.
    before_outage = redis.dump()
    redis.kill()
    run.call("vend, redis down", "GET", token_url, headers=client, expect=200)
    run.call("evict, redis down", "DELETE", token_url, headers=admin, expect=200)
    run.call("vend (miss), redis down", "GET", token_url, headers=client, expect=200)
    run.call("oauth, redis down", "POST", "/oauth/token", data=exchange, expect=200)
    run.call(
        "admin change, redis down",
        "PATCH",
        f"{creds_url}/spare",
        json={"product": "tms"},
        headers=admin,
        expect=200,
    )
    run.call("readyz, redis down", "GET", "/readyz", expect=200)
    redis.start()  # the same port, empty, with its password again
    wait_for(lambda: run.ready("ok"), what="readyz ok after Redis returned")
    run.call("vend, redis back", "GET", token_url, headers=client, expect=200)

    # PostgreSQL refused, then hung: 503s without a trace of a secret; then it comes back.
    proxy.cut("refuse")
    outage = {"name": "late", "region": "eu", "api_token": s.outage_token}
    run.call("vend (cached), database down", "GET", token_url, headers=client, expect=(200, 503))
    run.call(
        "vend (cold), database down",
        "GET",
        token_url,
        params={"credential": "nope"},
        headers=client,
        expect=503,
    )
    run.call("list teams, database down", "GET", "/v1/teams", headers=admin, expect=503)
    run.call(
        "create credential, database down",
        "POST",
        creds_url,
        json=outage,
        headers=admin,
        expect=503,
    )
    run.call(
        "rotate API token, database down",
        "PUT",
        f"{creds_url}/default/api-token",
        json={"api_token": s.outage_token},
        headers=admin,
        expect=503,
    )
    run.call(
        "new client, database down",
        "GET",
        token_url,
        headers=bearer(issue_key().key.get_secret_value()),
        expect=503,
    )
    run.call(
        "oauth, database down",
        "POST",
        "/oauth/token",
        data={**exchange, "credential": "nope"},
        expect=503,
    )
    run.call("readyz, database down", "GET", "/readyz", expect=503)
    proxy.restore()
    proxy.cut("hang")
    run.call(
        "create credential, database hung",
        "POST",
        creds_url,
        json=outage,
        headers=admin,
        expect=503,
    )
    proxy.restore()
    wait_for(lambda: run.ready("ok"), what="readyz ok after PostgreSQL returned")
    run.call("list teams, database back", "GET", "/v1/teams", headers=admin, expect=200)
    run.call("vend, database back", "GET", token_url, headers=client, expect=200)
    run.call("GET /readyz at the end", "GET", "/readyz", expect=200)
    return before_outage


def check_audit(audit: httpx.Response, vended: list[str]) -> None:
    """The trail references JWTs only by a short SHA-256 prefix, and does reference them."""
    text = audit.text
    for token in vended:
        assert token not in text
        for segment in token.split("."):
            assert segment not in text or len(segment) < 40  # the shared JOSE header is short
    prefixes = {hashlib.sha256(t.encode()).hexdigest()[:16] for t in vended}
    events = audit.json()["items"]
    noted = {e["jwt_sha256"] for e in events if e["action"] == "token.vend" and e["jwt_sha256"]}
    assert noted, "no vend was audited with its JWT fingerprint"
    assert noted <= prefixes


def redis_place(name: str, dump: bytes) -> Place:
    # What the search must have covered: sealed JWT entries and the expiry index.
    assert b":jwt:" in dump, "no JWT entry in the Redis dump"
    assert b"expiry" in dump
    return Place(name, dump, items=dump.count(b"KEY "))


def text_place(name: str, data: bytes) -> Place:
    return Place(name, data, items=data.count(b"\n"))


def pg_dump(database: str) -> bytes:
    result = subprocess.run(
        ["pg_dump", "--no-owner", "-h", "127.0.0.1", "-U", "postgres", database],
        capture_output=True,
        timeout=60,
        check=True,
    )
    # What the search must have covered: the sealed API tokens and the audit trail.
    assert b"CREATE TABLE public.credentials" in result.stdout
    assert b"token.vend" in result.stdout
    assert b"credential.rotate" in result.stdout
    return result.stdout


def search(
    canaries: Canaries, places: list[Place], responses: list[Place]
) -> tuple[list[str], list[str]]:
    """(summary lines, leaks): one line per kind of place, one leak per unexpected hit."""
    leaks: list[str] = []
    allowed_hits = 0
    lines = [f"{'searched':<40} {'items':>6} {'bytes':>10} {'hits':>5}  (items: lines/keys)"]
    for place in places:
        found = canaries.hits(place.data)
        leaks += [f"{place.name}: {name} ({kind})" for name, kind in found]
        lines.append(f"{place.name:<40} {place.items:>6} {len(place.data):>10} {len(found):>5}")
    response_hits = 0
    for place in responses:
        for name, kind in canaries.hits(place.data):
            if name in place.allowed:
                allowed_hits += 1
                continue
            response_hits += 1
            leaks.append(f"{place.name}: {name} ({kind})")
    size = sum(len(p.data) for p in responses)
    label = "responses (status, headers, bodies)"
    lines.append(f"{label:<40} {len(responses):>6} {size:>10} {response_hits:>5}")
    lines.append(
        f"canaries: {len(canaries.values)} ({sum(n.startswith('jwt-') for n in canaries.values)} "
        f"JWTs), forms per canary: raw, base64/base64url (+unpadded, 3 alignments), url, hex; "
        f"expected hits in responses (issued keys, vended JWTs): {allowed_hits}"
    )
    return lines, leaks


def test_the_search_finds_canaries_in_every_form() -> None:
    canaries = Canaries()
    canaries.add("planted", "phrdev_CANARYplanted0123456789")
    secret = b"phrdev_CANARYplanted0123456789"
    for prefix in (b"", b"x", b"xy"):
        blob = b'{"data": "' + base64.b64encode(prefix + secret + b"tail") + b'"}'
        assert canaries.hits(blob)[0][0] == "planted", prefix
        blob = base64.urlsafe_b64encode(prefix + secret).rstrip(b"=")
        assert canaries.hits(blob), prefix
    assert canaries.hits(b"\\x" + secret.hex().encode())
    assert canaries.hits(b"a=" + quote(secret.decode() + "/").encode())
    assert not canaries.hits(b"phrdev_CANARYplanted012345678")  # one character short


def test_no_canary_reaches_logs_responses_database_or_redis(
    workdir: Path, database: str, recording_idm: tuple[RecordingIdm, str]
) -> None:
    require_redis()
    require_binary("redis-server")
    idm, idm_url = recording_idm
    idm.reset(tokens=True)
    idm.signed.clear()
    s = Secrets.make()
    canaries = s.canaries()

    redis_dir = workdir / "redis"
    redis_dir.mkdir(exist_ok=True)
    redis = PasswordRedis(redis_dir, s.redis_password)
    redis.start()
    proxy = TcpProxy("127.0.0.1", 5432)
    proxy.__enter__()
    server = CapturedServer(
        workdir,
        {
            "TOKENVEND_DATABASE_URL": (
                f"postgresql+asyncpg://postgres:{s.db_password}@127.0.0.1:{proxy.port}/{database}"
            ),
            "TOKENVEND_REDIS_URL": redis.url,
            "TOKENVEND_REDIS_PREFIX": f"tokenvend:canary:{s.mark}:",
            "TOKENVEND_ENCRYPTION_KEYS": f"canary:{base64.b64encode(s.encryption_key).decode()}",
            "TOKENVEND_BOOTSTRAP_ADMIN_KEY": s.admin_key,
            "TOKENVEND_PHRASE_EU_URL": idm_url,
            "TOKENVEND_PHRASE_US_URL": idm_url,
            "TOKENVEND_WEBHOOK_URL": f"{idm_url}/_dev/redirect-target",
            "TOKENVEND_WEBHOOK_SECRET": s.webhook_secret,
            "TOKENVEND_LOG_LEVEL": "debug",
            "TOKENVEND_LOG_FORMAT": "json",
            "TOKENVEND_UPSTREAM_RETRIES": "0",
            "TOKENVEND_UPSTREAM_TIMEOUT_SECONDS": "1",
            "TOKENVEND_REQUEST_DEADLINE_SECONDS": "3",
            "TOKENVEND_CIRCUIT_FAILURE_THRESHOLD": "1000",
            "TOKENVEND_REDIS_TIMEOUT_SECONDS": "0.3",
            "TOKENVEND_MAX_BODY_BYTES": "4096",
        },
    )
    places: list[Place] = []
    run = Run(server.url, idm, s.admin_key)
    try:
        server.start()
        run.http.base_url = httpx.URL(server.url)
        before_outage = exercise(run, idm, redis, proxy, s, canaries)
        audit = run.call(
            "audit trail", "GET", "/v1/audit-events?limit=100", headers=run.admin, expect=200
        )
        check_audit(audit, run.vended)
        places += [
            redis_place("redis dump (before it was killed)", before_outage),
            redis_place("redis dump (end)", redis.dump()),
        ]
    finally:
        run.close()
        server.stop()
        proxy.__exit__(None, None, None)
        redis.stop()
    assert server.process is not None
    assert server.process.returncode == 0, server.log_tail()
    for token in idm.signed:
        canaries.add(jwt_name(token), token)
    places += [
        text_place("stdout", server.stdout_path.read_bytes()),
        text_place("stderr (app, access, uvicorn logs)", server.stderr_path.read_bytes()),
        text_place("pg_dump", pg_dump(database)),
    ]
    responses = [
        Place(f"{label} [{r.status_code}]", raw_response(r), allow)
        for label, r, allow in run.responses
    ]
    lines, leaks = search(canaries, places, responses)
    print("\ncanary search\n" + "\n".join(lines))
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks)
    # The search worked on this very data: what had to be found was found.
    assert len(run.vended) >= 10
    assert len(idm.signed) > len(set(run.vended))  # and some were signed but never vended
    assert len(server.stderr_path.read_bytes()) > 10_000, "debug logs were not captured"
