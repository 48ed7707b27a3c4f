"""Readiness (`/readyz`): the app has started and not begun to stop, the data directory
takes a real write, the store is reachable. Checks run off the loop, are bounded in
time and cached for a moment, so a busy load balancer costs one probe per TTL.

Answers everyone: the public body names failing checks only (never a path, a URL or a
store's own message); the reasons go to the status page and the log.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from aiohttp import web

from ..cache import LocalFiles
from ..singleflight import SharedCalls

log = logging.getLogger("gateway.ready")

# None: fine; else a short reason, shown to operators (the status page, the log).
Check = Callable[[], Awaitable[str | None]]
TTL = 1.5  # seconds an answer is reused: a load balancer polling hard costs no more
CHECK_TIMEOUT = 3.0  # a check that takes longer fails ("timed out"): a hung disk or store
# Full disks are the evictor's and the relay's business (the gateway keeps serving).
_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


@runtime_checkable
class ReadyStore(Protocol):
    """A store that can say whether it is reachable (an S3 store: a cheap request to its
    bucket). The reason must hold no secret; it is shown to operators only."""

    async def ready(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    reason: str | None  # None: passed

    @property
    def ok(self) -> bool:
        return self.reason is None


class Readiness:
    """The named checks, run together (each within CHECK_TIMEOUT), the answer kept for
    `ttl` seconds and shared by concurrent callers. `serving` is set by the composition
    root once the app has started, and cleared when it begins to stop."""

    def __init__(self, checks: Sequence[tuple[str, Check]], *, ttl: float = TTL,
                 timeout: float = CHECK_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.serving = False
        self._timeout = timeout
        self._checks = list(checks)
        self._ttl = ttl
        self._clock = clock
        self._last: tuple[float, list[Outcome]] | None = None
        self._calls: SharedCalls[str, list[Outcome]] = SharedCalls("readiness")
        self._failing: tuple[str, ...] = ()

    async def outcomes(self) -> list[Outcome]:
        """`started` as it is now (a stop shows at once), then the cached checks."""
        started = Outcome("started", None if self.serving else
                          "not serving (starting or stopping)")
        last = self._last
        if last is not None and self._clock() - last[0] < self._ttl:
            return [started, *last[1]]
        found, _ = await self._calls.call("all", self._run)
        return [started, *found]

    async def _run(self) -> list[Outcome]:
        found = list(await asyncio.gather(*(_bounded(name, check, self._timeout)
                                            for name, check in self._checks)))
        self._last = (self._clock(), found)
        failing = tuple(f"{o.name}: {o.reason}" for o in found if not o.ok)
        if failing != self._failing:  # logged when it changes, not at every probe
            if failing:
                log.warning("not ready: %s", "; ".join(failing))
            else:
                log.info("ready")
            self._failing = failing
        return found

    async def close(self) -> None:
        await self._calls.close()


async def _bounded(name: str, check: Check, seconds: float) -> Outcome:
    try:
        async with asyncio.timeout(seconds):
            return Outcome(name, await check())
    except TimeoutError:
        return Outcome(name, f"timed out after {seconds:g} s")
    except Exception as exc:  # a broken check is a failed one, not a 500
        return Outcome(name, f"check failed ({type(exc).__name__})")


def _probe(path: Path) -> None:
    """Create, write, fsync and remove a small file: what a spool or a commit does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"readyz\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def writable(data_dir: Path) -> Check:
    """The data directory takes a real write (in a thread). A probe that is still stuck
    in the kernel (a hung disk) is not started again: it is reported instead."""
    probe = Path(data_dir) / f".readyz-{os.getpid()}"
    running: list[asyncio.Future[None]] = []

    async def check() -> str | None:
        if running and not running[0].done():
            return "the last write probe has not returned (hung disk?)"
        future = asyncio.ensure_future(asyncio.to_thread(_probe, probe))
        # Retrieved even when no one awaits it any more (a timed-out probe).
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        running[:] = [future]
        try:
            await asyncio.shield(future)  # a timeout leaves the thread to finish on its own
        except OSError as exc:
            if exc.errno in _SPACE:
                return None
            return f"data directory not writable ({errno.errorcode.get(exc.errno or 0, 'OSError')})"
        return None

    return check


def store_reachable(store: object, root: Path | None) -> Check:
    """The store answers: its own `ready()` if it has one (ReadyStore), else for a store
    of local files (LocalFiles) that its directory `root` is there. A store with neither
    is taken as reachable."""

    async def check() -> str | None:
        if isinstance(store, ReadyStore):
            return await store.ready()
        if isinstance(store, LocalFiles) and root is not None and \
                not await asyncio.to_thread(os.path.isdir, root):
            return "store directory missing"
        return None

    return check


def public_body(outcomes: Sequence[Outcome]) -> tuple[int, dict[str, object]]:
    """The status and JSON of /readyz: check names only (the reasons may name paths)."""
    failing = [o.name for o in outcomes if not o.ok]
    body: dict[str, object] = {"ready": not failing}
    if failing:
        body["failing"] = failing
    return (503 if failing else 200), body


async def readyz(request: web.Request, readiness: Readiness) -> web.Response:
    status, body = public_body(await readiness.outcomes())
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})
