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
        self._idle = asyncio.Event()
        self._idle.set()

    def acquire(self) -> None:
        self.users += 1
        self._idle.clear()

    def release(self) -> None:
        self.users -= 1
        if not self.users:
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
            await self._idle.wait()
