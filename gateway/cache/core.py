"""The cache of one process: manifests and blobs over one store and one index, with the
process's own spool directory. Opened and closed by the composition root.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..metrics import Metrics
from .blobs import Blobs
from .diskfull import DiskFull
from .index import Index
from .manifests import Manifests
from .spool import ProcessDir
from .store import BlobStore

log = logging.getLogger("gateway.cache")


class Cache:
    def __init__(self, store: BlobStore, index: Index, metrics: Metrics, spool: ProcessDir,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.index = index
        self.spool = spool
        # The evictor plugs in here: `cache.disk.make_room = evictor.make_room`.
        self.disk = DiskFull(metrics, clock)
        self.blobs = Blobs(store, index, metrics, lambda: spool.path, disk=self.disk)
        self.manifests = Manifests(store, index, metrics, clock, disk=self.disk)

    async def open(self) -> None:
        """Take our spool directory; remove what dead processes left in theirs."""
        swept = await asyncio.to_thread(self.spool.open)
        if swept:
            log.info("removed %d spool leftovers of stopped gateway processes", len(swept))

    async def close(self) -> None:
        await self.blobs.flights.close()
        await self.manifests.calls.close()
        await asyncio.to_thread(self.spool.close)
