"""Real HTTP servers for tests: any ASGI app under uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class ServerThread:
    """Runs an ASGI app in a real uvicorn server, in a daemon thread with its own event loop.

    The socket is bound here, before the server starts, so `url` is known at once and no other
    process can take the port between picking and binding it.

        with ServerThread(app) as server:
            httpx.get(f"{server.url}/healthz")
    """

    def __init__(
        self, app: Any, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 10.0
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        )
        self._startup_timeout = startup_timeout
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                self._socket.close()
                raise RuntimeError(f"server for {self.url} exited during startup")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server for {self.url} did not start in time")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        if self._thread.is_alive():  # a request that never finishes must not hang the suite
            self.server.force_exit = True
            self._thread.join(timeout=5)
        self._socket.close()
