"""One in-flight piece of work per key, owned here so it outlives the caller that began it.

The one mechanism behind blob fetches, manifest fetches and upstream tokens, and the
seam where coordination across processes and replicas plugs in. No I/O of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class SingleFlight(Generic[K, V]):
    """Per key, a value that callers share (a result's future, a transfer they follow)
    and the task that works on it. The entry leaves when its task ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[K, tuple[V, asyncio.Task[Any]]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[K, V]]:
        """The entries under way now (a snapshot: for the status page)."""
        return [(key, entry[0]) for key, entry in self._entries.items()]

    def join(self, key: K, start: Callable[[], tuple[V, Coroutine[Any, Any, Any]]]
             ) -> tuple[V, bool]:
        """The entry for `key`, begun with `start()` if there is none; True if begun here."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry[0], False
        value, work = start()
        task = asyncio.get_running_loop().create_task(work, name=f"{self.name} {key}")
        self._entries[key] = (value, task)
        task.add_done_callback(lambda _t: self._forget(key, task))
        return value, True

    def _forget(self, key: K, task: asyncio.Task[Any]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry[1] is task:
            del self._entries[key]

    async def close(self) -> None:
        tasks = [task for _value, task in self._entries.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class SharedCalls(Generic[K, T]):
    """Single flight for a computed result: concurrent callers of one key share one call."""

    def __init__(self, name: str) -> None:
        self._flights: SingleFlight[K, asyncio.Future[T]] = SingleFlight(name)

    def __len__(self) -> int:
        return len(self._flights)

    def running(self, key: K) -> bool:
        """Whether a call for `key` is under way (a new caller would share it)."""
        return self._flights.get(key) is not None

    async def call(self, key: K, compute: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """`compute()`'s result, shared; True for the caller whose call computed it."""

        def start() -> tuple[asyncio.Future[T], Coroutine[Any, Any, None]]:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            return future, _settle(future, compute)

        future, started = self._flights.join(key, start)
        return await asyncio.shield(future), started

    async def close(self) -> None:
        await self._flights.close()


async def _settle(future: asyncio.Future[T], compute: Callable[[], Awaitable[T]]) -> None:
    try:
        result = await compute()
    except asyncio.CancelledError:
        future.cancel()
        raise
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved: every caller may have gone away
    else:
        future.set_result(result)
