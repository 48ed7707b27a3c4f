"""The most pulled repositories, in bounded memory: a Space-Saving top-k counter (Metwally
et al., 2005) fed by the manifest GETs the gateway answered, for the status page.

At most `capacity` names are ever held, whatever clients ask for; below that the counts
are exact. Per process (each worker counts its own); never in /metrics (unbounded names).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from ..state import RequestState

K = TypeVar("K", bound=Hashable)
CAPACITY = 1000
PENDING = 256


@dataclass(frozen=True, slots=True)
class Counted(Generic[K]):
    key: K
    count: int
    error: int  # the count may be over by at most this much (0: exact)


class TopK(Generic[K]):
    """Space-Saving with counts bucketed by value, so every `add` is O(1): when full, a
    new key takes the place of one with the smallest count and inherits that count + 1
    (its `error`), which keeps every key that is really frequent in the table."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._counts: dict[K, tuple[int, int]] = {}  # key -> (count, error)
        self._by_count: dict[int, dict[K, None]] = {}  # count -> keys (insertion ordered)
        self._min = 0

    def __len__(self) -> int:
        return len(self._counts)

    def _place(self, key: K, count: int, error: int) -> None:
        self._counts[key] = (count, error)
        self._by_count.setdefault(count, {})[key] = None

    def _unplace(self, key: K, count: int) -> None:
        keys = self._by_count[count]
        del keys[key]
        if not keys:
            del self._by_count[count]
            if count == self._min:
                self._min = count + 1  # the key moves to count + 1 (or leaves for a new one)

    def add(self, key: K, by: int = 1) -> None:
        """Count `key` `by` times (as `by` adds of one would, in one step)."""
        found = self._counts.get(key)
        if found is not None:
            count, error = found
            self._unplace(key, count)
            self._place(key, count + by, error)
        elif len(self._counts) < self.capacity:
            self._place(key, by, 0)
            self._min = min(self._min, by) if len(self._counts) > 1 else by
        else:
            floor = self._min
            victim = next(iter(self._by_count[floor]))  # the oldest of the least counted
            self._unplace(victim, floor)
            del self._counts[victim]
            self._place(key, floor + by, floor)
        if by != 1:  # _unplace assumed a step of one when it moved _min
            self._min = min(self._by_count)

    def top(self, n: int) -> list[Counted[K]]:
        ranked = heapq.nlargest(n, self._counts.items(), key=lambda item: item[1][0])
        return [Counted(key, count, error) for key, (count, error) in ranked]


class Pulls:
    """Counts pulls per (route, repository): manifest GETs (by tag or digest) answered
    200, the requests Docker Hub counts as pulls. `count` sees every answer."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.counter: TopK[tuple[str, str]] = TopK(capacity)
        # Pulls not yet in the counter: a dict increment per answer, folded in as one
        # weighted add per repository when asked or when it holds PENDING names.
        self._pending: dict[tuple[str, str], int] = {}

    def count(self, request: web.Request, response: web.StreamResponse,
              state: RequestState | None) -> None:
        """Called as each answer's headers go out (with the common headers)."""
        reg = state.registry if state is not None else None
        if reg is not None and reg.kind == "manifest" and request.method == "GET" and \
                response.status == 200:
            self.pulled(reg.route.name, reg.repository)

    def pulled(self, route: str, repository: str) -> None:
        """One pull (the server's registry lane says so of the manifests it writes)."""
        key = (route, repository)
        pending = self._pending
        pending[key] = pending.get(key, 0) + 1
        if len(pending) >= PENDING:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending = self._pending, {}
        for key, count in pending.items():
            self.counter.add(key, count)

    def top(self, n: int) -> list[dict[str, object]]:
        self._fold()
        return [{"route": c.key[0], "repository": c.key[1], "pulls": c.count,
                 "error": c.error} for c in self.counter.top(n)]
