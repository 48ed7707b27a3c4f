"""A long-running task a component owns (the evictor, the pin keeper, the certificate
watcher, the loop-lag monitor): started once, cancelled and awaited on close. And a step
that a cancel must not cut in half.

The one place for that dance; no I/O, no imports from the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Background:
    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task[None] | None = None

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        self._task = asyncio.get_running_loop().create_task(work, name=self.name)

    async def stop(self) -> None:
        """Cancel and wait (idempotent)."""
        if self._task is not None:
            task = self._task
            while not task.done():
                # Asked again until it ends: Python 3.11's wait_for swallows a cancel that
                # arrives as its awaitable completes (gh-86296), and the evictor's loop,
                # woken at that moment, would run on and this would wait forever.
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None


async def finish(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the caller is cancelled meanwhile, then pass the
    cancel on: for a step that must not stop half done (a blob renamed into the store
    but not yet in the catalogue, which a clean stop would never rescan)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise
