"""The size cap across replicas on one bucket (`redis:`): each replica's evictor publishes
the bytes its own catalogue holds (the objects it committed) in one Redis hash and
subtracts what the others hold from `cache.max_size`, so the sum stays under the cap.

Each object is in the catalogue of the replica that committed it, so the sum is the
bucket's usage. Without Redis a replica bounds its own catalogue (the others' last
known bytes still count). Deletes nothing itself; the evictor decides what goes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis
import redis.exceptions

REDIS_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class ReplicaUsage:
    def __init__(self, prefix: str, replica: str,
                 client: Callable[[], aioredis.Redis | None]) -> None:
        self.key = f"{prefix}usage"
        self.replica = replica  # this replica's field: its advertised URL
        self._client = client
        self._others = 0  # the last sum read: kept while Redis is away
        self._retry_at = 0.0

    async def __call__(self, used: int) -> int:
        """Publish `used` (this replica's bytes); the bytes the other replicas hold."""
        client = self._client()
        if client is None or time.monotonic() < self._retry_at:
            return self._others
        try:
            await client.hset(self.key, self.replica, str(used))
            values = await client.hgetall(self.key)
        except REDIS_ERRORS:
            self._retry_at = time.monotonic() + 1.0
            return self._others
        total = 0
        for field, value in values.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            text = value.decode() if isinstance(value, bytes) else str(value)
            if name != self.replica and text.isdigit():
                total += int(text)
        self._others = total
        return total
