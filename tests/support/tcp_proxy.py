"""A real TCP proxy for fault tests: put it between the app and a server, then cut the line.

It runs an asyncio loop in a daemon thread of its own, so the proxied connections keep their
timing whatever the test's event loop is doing. The listening port is bound in the constructor
and kept across cuts, so the URL pointing at the proxy never changes.

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/db"
        proxy.cut("refuse")   # every connection reset, new ones refused: a dead server
        proxy.cut("hang")     # nothing flows, new connections accepted and never answered
        proxy.restore()

`refuse` is a crashed or stopped server (RST, ECONNREFUSED); `hang` is a frozen one or a silent
network partition (SIGSTOP, a dropped route): bytes already read are held, not dropped, so a
restore resumes the held connections where they stopped, as a healed partition would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

CutMode = Literal["refuse", "hang"]
T = TypeVar("T")
CHUNK = 65536


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self._listener = self._bind(0)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0  # connections accepted since start, for assertions
        self.state: Literal["open", "refuse", "hang"] = "open"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    # --- control, from the test's thread -------------------------------------------------------

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def cut(self, mode: CutMode = "refuse") -> None:
        """`refuse`: reset every connection and refuse new ones. `hang`: stop every byte in both
        directions and accept new connections without ever connecting them upstream."""
        self._call(self._cut(mode))

    def restore(self) -> None:
        self._call(self._restore())

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # --- inside the proxy's loop ---------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listener)

    async def _cut(self, mode: CutMode) -> None:
        assert self._flowing is not None
        self.state = mode
        if mode == "hang":
            self._flowing.clear()
            return
        self._flowing.set()  # nothing waits on a refused line
        if self._server is not None:
            self._server.close()  # closes the listening socket: new connections are refused
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # RST, as from a crashed server
        self._writers.clear()

    async def _restore(self) -> None:
        assert self._flowing is not None
        if self.state == "refuse":
            self._listener = self._bind(self.port)
            await self._listen()
        self.state = "open"
        self._flowing.set()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        self._writers.add(client_w)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._flowing.wait()  # hang: accepted, never connected upstream
            if client_w.transport.is_closing():
                return
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(server_w)
            try:
                await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
            finally:
                self._writers.discard(server_w)
                server_w.transport.abort()
        finally:
            self._writers.discard(client_w)
            client_w.transport.abort()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                await (
                    self._flowing.wait()
                )  # hang: hold what was read; TCP backpressure does the rest
                if writer.transport.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        # One side finished: end the other (half-close is not worth modelling here).
        writer.transport.abort()
