"""The index replicas share (`redis:`): tags and the negative cache in Redis, so a tag one
replica revalidated, or a 404 one heard, holds on every replica; blob sizes stay in this
process's memory (a digest's size never changes; any replica may learn it once).

Redis is never the truth: when it does not answer, this process's `MemoryIndex` answers
(and is kept current), and Redis is tried again a second later.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import redis.exceptions

from .index import BlobKey, MemoryIndex, NegativeKey, TagKey
from .policy import TagEntry

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)
RETRY = 1.0  # seconds without Redis after it failed
TAG_SECONDS = 30 * 86400  # a tag entry unread this long leaves Redis (the store keeps it)


def _name(prefix: str, kind: str, parts: tuple[str, ...]) -> str:
    return f"{prefix}{kind}:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


class RedisIndex:
    """Implements Index over the client `client()` gives (None: not open yet, or no
    Redis), with `local` as fallback."""

    def __init__(self, prefix: str, client: Callable[[], aioredis.Redis | None],
                 clock: Callable[[], float]) -> None:
        self.prefix = prefix
        self.local = MemoryIndex(clock)
        self._client = client
        self._retry_at = 0.0

    def _redis(self) -> aioredis.Redis | None:
        return self._client() if time.monotonic() >= self._retry_at else None

    def _failed(self) -> None:
        self._retry_at = time.monotonic() + RETRY

    async def tag(self, key: TagKey) -> TagEntry | None:
        client = self._redis()
        if client is not None:
            try:
                raw = await client.get(_name(self.prefix, "tag", key))
            except REDIS_ERRORS:
                self._failed()
            else:
                entry = TagEntry.decode(raw if isinstance(raw, bytes) else raw.encode()) \
                    if raw is not None else None
                if entry is not None:
                    await self.local.set_tag(key, entry)
                return entry
        return await self.local.tag(key)

    def held_tag(self, key: TagKey) -> TagEntry | None:
        return None  # Redis holds the tag: another replica may have moved it

    async def set_tag(self, key: TagKey, entry: TagEntry) -> None:
        await self.local.set_tag(key, entry)
        client = self._redis()
        if client is not None:
            try:
                await client.set(_name(self.prefix, "tag", key), entry.encode(), ex=TAG_SECONDS)
            except REDIS_ERRORS:
                self._failed()

    async def blob_size(self, key: BlobKey) -> int | None:
        return await self.local.blob_size(key)

    async def set_blob(self, key: BlobKey, size: int) -> None:
        await self.local.set_blob(key, size)

    async def forget_blob(self, key: BlobKey) -> None:
        await self.local.forget_blob(key)

    async def touch(self, key: BlobKey) -> None:
        await self.local.touch(key)

    async def last_access(self, key: BlobKey) -> float | None:
        return await self.local.last_access(key)

    async def missing(self, key: NegativeKey) -> bool:
        client = self._redis()
        if client is not None:
            try:
                return bool(await client.exists(_name(self.prefix, "missing", key)))
            except REDIS_ERRORS:
                self._failed()
        return await self.local.missing(key)

    async def set_missing(self, key: NegativeKey, ttl: float) -> None:
        await self.local.set_missing(key, ttl)
        client = self._redis()
        if client is not None and ttl > 0:
            try:
                await client.set(_name(self.prefix, "missing", key), b"1",
                                 px=max(int(ttl * 1000), 1))
            except REDIS_ERRORS:
                self._failed()
