"""Who is using an upstream client (a request, a blob flight, a manifest fetch): after a
reload replaced its route, the client is closed only once they are all done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Self


class Users:
    def __init__(self) -> None:
        self.users = 0
        # Made by the first `drained()` that has to wait: every request acquires and
        # releases, and setting an Event nobody waits on twice a request is a cost.
        self._idle: asyncio.Event | None = None

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if not self.users and self._idle is not None:
            self._idle.set()

    @contextmanager
    def in_use(self) -> Iterator[Self]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    async def drained(self) -> None:
        """Return once nobody uses this upstream (at once if nobody does)."""
        while self.users:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()
