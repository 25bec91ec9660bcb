"""Real processes for the fault tests: a redis-server the test owns and `tokenvend serve`.

Both are started as new sessions so that stopping one signals exactly the process group the test
started (uvicorn's workers included), never anything found by name. Their output goes to a log file
in the caller's directory; `log_tail()` puts the end of it into an assertion message.

    with RedisServer(workdir) as redis:
        redis.pause()      # SIGSTOP: connections stay open, nothing answers
        redis.resume()     # SIGCONT
        redis.kill()       # SIGKILL: connections refused
        redis.restart()    # the same port, empty
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def require_binary(name: str) -> str:
    """The executable's path; skip without it, fail in CI (like `tests.fixtures.services`)."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not on PATH"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; in CI every test must run", pytrace=False)
    pytest.skip(f"{message}; install it to run this test")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _OwnedProcess:
    """A child in its own session, stopped by signalling its process group."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal(self, signum: signal.Signals) -> None:
        if self.running:
            os.killpg(self.pid, signum)

    def pause(self) -> None:
        """SIGSTOP the whole group: the port keeps accepting connections, nothing answers."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def _exited(self) -> bool:
        """Whether the leader has exited, without reaping it: an unreaped leader keeps its pid,
        and so its process group id, from being reused by an unrelated process."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped
        return info is not None

    def _reap(self, grace: float) -> None:
        """SIGTERM to the group (after SIGCONT: a stopped process cannot act on it), SIGKILL to
        whatever is left after `grace` seconds (at once with grace 0), then reap the leader."""
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            deadline = time.monotonic() + grace
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.02)
            # The leader is alive or a zombie here, so the group id is still ours: workers left
            # behind by a leader that died first go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


class RedisServer(_OwnedProcess):
    """`redis-server --port <free> --save "" --appendonly no`, owned by one test."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir / "redis.log")
        self.workdir = workdir
        self.port = port or free_port()
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        argv = [
            require_binary("redis-server"),
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
        ]
        deadline = time.monotonic() + timeout
        while True:
            self._spawn(argv, os.environ, self.workdir)
            while time.monotonic() < deadline and self.running:
                if self.ping():
                    self.paused = False
                    return
                time.sleep(0.02)
            if self.running or time.monotonic() >= deadline:
                self._reap(0)
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}")
            # Exited at once: the port may still be held by the killed predecessor; try again.
            time.sleep(0.1)

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def pause(self) -> None:
        super().pause()
        self.paused = True

    def resume(self) -> None:
        super().resume()
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: gone at once, without a shutdown; its data with it."""
        self._reap(0)
        self.paused = False

    def restart(self) -> None:
        """Kill if alive, then start again on the same port: an empty Redis."""
        self.kill()
        self.start()

    def stop(self) -> None:
        self._reap(0)  # nothing to persist

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def tokenvend_argv(*args: str) -> list[str]:
    """The installed `tokenvend` script of this interpreter, else `python -m app.cli`."""
    script = Path(sys.executable).with_name("tokenvend")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "app.cli", *args]


def clean_environ() -> dict[str, str]:
    """The test process's environment without anything that configures tokenvend."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TOKENVEND_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }


class TokenvendServer(_OwnedProcess):
    """`tokenvend serve` on a free loopback port, with exactly the given `TOKENVEND_*` settings.

    It runs in `workdir`, so no `.env` of the checkout leaks in; the package comes from the
    interpreter's installation (editable) or from `PYTHONPATH`.
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        workers: int = 1,
        name: str = "tokenvend",
    ) -> None:
        super().__init__(workdir / f"{name}.log")
        self.workdir = workdir
        self.env = dict(env)
        self.workers = workers
        self.name = name
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        env = clean_environ()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        argv = tokenvend_argv(
            "serve", "--host", LOOPBACK, "--port", str(self.port), "--workers", str(self.workers)
        )
        self._spawn(argv, env, self.workdir)
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=1.0) as http:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"{self.name} exited during startup:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/healthz").status_code == 200:
                        return
                time.sleep(0.05)
        self._reap(2)
        raise RuntimeError(
            f"{self.name} did not answer /healthz in {timeout} s:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 5.0) -> None:
        self._reap(grace)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
