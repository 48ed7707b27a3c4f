"""Run an aiohttp application in a background thread with its own event loop.

The token server, the counting proxy and the fake registry run this way so that a test
can block on a subprocess (skopeo, docker) while they keep serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from aiohttp import web

from .net import ensure_loopback

T = TypeVar("T")


class ThreadedServer:
    """An aiohttp application served on host:port (0 = pick one) from its own thread.

    It takes a factory rather than an application because an `Application` is bound
    to the loop it first ran on; a stopped server starts again with a fresh one on
    the same port (an upstream that goes away and comes back).
    """

    def __init__(self, make_app: Callable[[], web.Application], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        ensure_loopback(host)
        self.make_app = make_app
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already running")
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run, name=f"aiohttp-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("threaded server did not start")
        if self._startup_error is not None:
            self._thread.join(10)
            self._thread = None
            raise RuntimeError("threaded server failed to start") from self._startup_error

    def stop(self) -> None:
        """Stop serving and close open connections; a stopped server can be started again."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop from the test thread and return its result."""
        if self._loop is None:
            raise RuntimeError("not running")

        async def wrapper() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        # A short shutdown timeout: a stopping test server must cut slow transfers, not wait.
        runner: web.AppRunner | None = None
        try:
            runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as error:  # handed to start() in the test thread
            self._startup_error = error
            if runner is not None:
                loop.run_until_complete(runner.cleanup())
            loop.close()
            self._loop = None
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None


@contextmanager
def serve_in_thread(
    make_app: Callable[[], web.Application], *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ThreadedServer]:
    server = ThreadedServer(make_app, host=host, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
