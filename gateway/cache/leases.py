"""Leases: a manifest served is held for a while (`cache.lease`), so a pull that has
its manifest finds its blobs; readers: a blob being sent is never evicted under a
client. Both are this process's memory, checked by the evictor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Key = tuple[str, str]  # namespace, digest


class Leases:
    def __init__(self, clock: Callable[[], float], seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._served: dict[Key, float] = {}

    def grant(self, namespace: str, digest: str) -> None:
        self._served[(namespace, digest)] = self._clock()

    def held(self, namespace: str, digest: str) -> bool:
        served = self._served.get((namespace, digest))
        if served is None:
            return False
        if self._clock() - served < self.seconds:
            return True
        del self._served[(namespace, digest)]
        return False

    def prune(self) -> None:
        now = self._clock()
        for key in [k for k, t in self._served.items() if now - t >= self.seconds]:
            del self._served[key]


class Readers:
    def __init__(self) -> None:
        self._count: Counter[Key] = Counter()

    @contextmanager
    def reading(self, namespace: str, digest: str) -> Iterator[None]:
        key = (namespace, digest)
        self._count[key] += 1
        try:
            yield
        finally:
            self._count[key] -= 1
            if not self._count[key]:
                del self._count[key]

    def busy(self, namespace: str, digest: str) -> bool:
        return (namespace, digest) in self._count
