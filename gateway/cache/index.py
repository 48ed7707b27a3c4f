"""What the cache knows about its contents besides the bytes: tags, blob sizes and last
access, upstream 404s remembered for a while.

`Index` is the protocol (memory now; sqlite and Redis implementations plug in here);
the store stays the truth, so an index may forget anything and only costs a lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cachetools import LRUCache, TLRUCache

from .policy import TagEntry, View

TagKey = tuple[str, str, str, View]  # namespace, repository, tag, view
BlobKey = tuple[str, str]  # namespace, digest
NegativeKey = tuple[str, str, str]  # namespace, repository, reference


class Index(Protocol):
    async def tag(self, key: TagKey) -> TagEntry | None: ...

    def held_tag(self, key: TagKey) -> TagEntry | None:
        """The tag as this process holds it, without I/O; None: ask `tag()` (an index
        shared between replicas holds none: another replica may have moved the tag)."""

    async def set_tag(self, key: TagKey, entry: TagEntry) -> None: ...

    async def blob_size(self, key: BlobKey) -> int | None: ...

    async def set_blob(self, key: BlobKey, size: int) -> None:
        """A blob committed (or found) in the store with this size; counts as an access."""

    async def forget_blob(self, key: BlobKey) -> None: ...

    async def touch(self, key: BlobKey) -> None:
        """A blob was read: its last access is now (batched by implementations that store it)."""

    async def last_access(self, key: BlobKey) -> float | None: ...

    async def missing(self, key: NegativeKey) -> bool:
        """The upstream said 404 for this reference within its negative TTL."""

    async def set_missing(self, key: NegativeKey, ttl: float) -> None: ...


class MemoryIndex:
    """The index of one process, in bounded LRU maps."""

    def __init__(self, clock: Callable[[], float], *, tags: int = 200_000,
                 blobs: int = 500_000, negative: int = 100_000) -> None:
        self._clock = clock
        self._tags: LRUCache[TagKey, TagEntry] = LRUCache(maxsize=tags)
        self._blobs: LRUCache[BlobKey, tuple[int, float]] = LRUCache(maxsize=blobs)
        self._negative: TLRUCache[NegativeKey, float] = TLRUCache(
            maxsize=negative, ttu=lambda _k, ttl, now: now + ttl, timer=clock)

    async def tag(self, key: TagKey) -> TagEntry | None:
        return self._tags.get(key)

    def held_tag(self, key: TagKey) -> TagEntry | None:
        return self._tags.get(key)

    async def set_tag(self, key: TagKey, entry: TagEntry) -> None:
        self._tags[key] = entry

    async def blob_size(self, key: BlobKey) -> int | None:
        found = self._blobs.get(key)
        return found[0] if found is not None else None

    async def set_blob(self, key: BlobKey, size: int) -> None:
        self._blobs[key] = (size, self._clock())

    async def forget_blob(self, key: BlobKey) -> None:
        self._blobs.pop(key, None)

    async def touch(self, key: BlobKey) -> None:
        found = self._blobs.get(key)
        if found is not None:
            self._blobs[key] = (found[0], self._clock())

    async def last_access(self, key: BlobKey) -> float | None:
        found = self._blobs.get(key)
        return found[1] if found is not None else None

    async def missing(self, key: NegativeKey) -> bool:
        return key in self._negative

    async def set_missing(self, key: NegativeKey, ttl: float) -> None:
        if ttl > 0:
            self._negative[key] = ttl
