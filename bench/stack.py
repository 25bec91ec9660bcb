"""What the benchmark runs on loopback: a fresh PostgreSQL database, a Redis key prefix of its own,
the development IdM, tokenvend and the reference app, each a child process in its own session.

Every child is stopped through its own process group (the id of the child we started), never by
name, and the database and the Redis keys are removed at the end, also after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import asyncpg
import httpx
from redis.asyncio import Redis

from app.auth import keys
from app.cli import upgrade_database
from app.core.crypto import Keyring

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
PG_ADMIN_URL = os.environ.get("TOKENVEND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TOKENVEND_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def child_environ(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without anything that configures tokenvend, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TOKENVEND_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Child:
    """A server process in its own session; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, grace: float = 5.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        # Workers of a leader that is gone share its process group: take them with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class HttpServer(Child):
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        workdir: Path,
        port: int,
        ready_path: str,
    ) -> None:
        super().__init__(name, argv, env, workdir)
        self.port = port
        self.ready_path = ready_path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(base_url=self.url, timeout=1.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(self.ready_path)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not get ready in {within} s:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's spawned workers, or the server itself
        when it runs one worker in-process."""
        children = [
            pid
            for pid in _children(self.pid)
            if b"spawn_main" in _cmdline(pid) and b"resource_tracker" not in _cmdline(pid)
        ]
        return children or [self.pid]


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) follows the command name, which is in parentheses and may hold spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == parent:
            found.append(int(entry))
    return sorted(found)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process in MiB, from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return total - idle, total


def tokenvend_argv(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("tokenvend")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "app.cli", *args]


@dataclass
class Stack:
    """The whole benchmark setup. `tokenvend` servers are keyed by their worker count."""

    pg_admin_url: str = PG_ADMIN_URL
    redis_url: str = REDIS_URL
    want_workers: tuple[int, ...] = (1,)
    want_reference: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workdir: Path = field(init=False)
    database: str = field(init=False)
    prefix: str = field(init=False)
    admin_key: str = field(init=False)
    encryption_keys: str = field(init=False)
    idm: HttpServer = field(init=False)
    servers: dict[int, HttpServer] = field(init=False, default_factory=dict)
    references: dict[int, HttpServer] = field(init=False, default_factory=dict)
    reference_token: str = field(init=False)
    _children: list[Child] = field(init=False, default_factory=list)
    _db_created: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="tokenvend-bench-"))
        self.database = f"tokenvend_bench_{self.run_id}"
        self.prefix = f"tokenvend:bench:{self.run_id}:"
        self.admin_key = keys.issue_key().key.get_secret_value()
        self.encryption_keys = Keyring.generate_spec("bench")
        self.reference_token = f"ref_{uuid.uuid4().hex}"

    @property
    def database_url(self) -> str:
        base = self.pg_admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        return f"{base}/{self.database}"

    @property
    def keyring(self) -> Keyring:
        return Keyring.parse(self.encryption_keys)

    @property
    def reference_key(self) -> str:
        return f"{self.prefix}reference:jwt"

    async def database_transactions(self) -> int:
        """Transactions committed and rolled back in the benchmark's database so far."""
        conn = await asyncpg.connect(self.pg_admin_url)
        try:
            count = await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
                self.database,
            )
        finally:
            await conn.close()
        return int(count or 0)

    def tokenvend_env(self) -> dict[str, str]:
        idm = self.idm.url
        return {
            "TOKENVEND_DATABASE_URL": self.database_url,
            "TOKENVEND_REDIS_URL": self.redis_url,
            "TOKENVEND_REDIS_PREFIX": self.prefix,
            "TOKENVEND_ENCRYPTION_KEYS": self.encryption_keys,
            "TOKENVEND_BOOTSTRAP_ADMIN_KEY": self.admin_key,
            "TOKENVEND_PHRASE_EU_URL": idm,
            "TOKENVEND_PHRASE_US_URL": idm,
            # The limiter still runs (one EVALSHA per request) but never throttles the benchmark.
            "TOKENVEND_RATE_LIMIT_PER_SECOND": "1000000",
            "TOKENVEND_RATE_LIMIT_BURST": "10000000",
            "TOKENVEND_LOG_LEVEL": "WARNING",
            "TOKENVEND_LOG_FORMAT": "json",
            "TOKENVEND_ACCESS_LOG": "false",
        }

    async def start(self) -> None:
        await _pg_execute(self.pg_admin_url, f'CREATE DATABASE "{self.database}"')
        self._db_created = True
        await asyncio.to_thread(upgrade_database, self.database_url)

        port = free_port()
        self.idm = await self._serve(
            "dev-idm",
            port,
            tokenvend_argv("dev-idm", "--host", LOOPBACK, "--port", str(port)),
            {},
            "/_dev/state",
        )
        # One at a time: each server makes sure the bootstrap admin exists at start, and two
        # first starts racing to insert it would collide.
        for workers in sorted(self.want_workers):
            port = free_port()
            self.servers[workers] = await self._serve(
                f"tokenvend-w{workers}",
                port,
                tokenvend_argv(
                    "serve", "--host", LOOPBACK, "--port", str(port), "--workers", str(workers)
                ),
                self.tokenvend_env(),
                "/readyz",
            )
        if self.want_reference:
            # With as many workers as tokenvend gets: what a bare app scales to on this machine.
            reference_env = {
                "BENCH_REF_REDIS_URL": self.redis_url,
                "BENCH_REF_KEY": self.reference_key,
                "BENCH_REF_TOKEN": self.reference_token,
            }
            for workers in sorted(self.want_workers):
                port = free_port()
                self.references[workers] = await self._serve(
                    f"reference-w{workers}",
                    port,
                    [
                        *(sys.executable, "-m", "bench.reference", "--host", LOOPBACK),
                        *("--port", str(port), "--workers", str(workers)),
                    ],
                    reference_env,
                    "/healthz",
                )

    async def _serve(
        self, name: str, port: int, argv: list[str], env: Mapping[str, str], health: str
    ) -> HttpServer:
        """Start a server and wait until `health` answers."""
        server = HttpServer(name, argv, child_environ(env), self.workdir, port, health)
        self._launch(server)
        await server.wait_ready()
        return server

    @property
    def reference(self) -> HttpServer | None:
        return self.references.get(1)

    def _launch(self, child: Child) -> None:
        self._children.append(child)
        child.start()

    async def close(self) -> None:
        for child in reversed(self._children):
            await asyncio.to_thread(child.stop)
        redis = Redis.from_url(self.redis_url)
        try:
            batch = [key async for key in redis.scan_iter(match=f"{self.prefix}*", count=1000)]
            for start in range(0, len(batch), 1000):
                await redis.delete(*batch[start : start + 1000])
        finally:
            await redis.aclose()
        if self._db_created:
            await _pg_execute(
                self.pg_admin_url, f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'
            )

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
        if exc is None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            print(f"bench: the servers' logs are kept in {self.workdir}", file=sys.stderr)


async def _pg_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
