"""The cache of one process: manifests and blobs over one store, the hot-path index and
the catalogue, the evictor that keeps the disk within its limits, and the process's
own spool directory. Built and opened by the composition root.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from ..config import Config
from ..metrics import Metrics
from .blobs import Blobs
from .contents import Contents, Entry, Root
from .coordinate import Coordinator, InProcess
from .diskfull import DiskFull
from .evict import Evictor
from .index import Index
from .leases import Leases, Readers
from .manifests import Manifests
from .spool import ProcessDir
from .store import BlobStore

log = logging.getLogger("gateway.cache")
SHARED_LOOK = 2.0  # seconds between the primary's eviction looks when workers share the disk


class Cache:
    def __init__(self, config: Config, data_dir: Path, store: BlobStore, index: Index,
                 contents: Contents, metrics: Metrics, spool: ProcessDir,
                 clock: Callable[[], float], *, coordinator: Coordinator | None = None,
                 primary: bool = True) -> None:
        self.config = config
        # Workers: single flight across the processes on this data directory, and the
        # once-per-directory work (eviction passes, sweeps) in the primary one only.
        self.coordinator: Coordinator = coordinator or InProcess()
        self.primary = primary
        self.store = store
        self.index = index
        self.contents = contents
        self.spool = spool
        self.leases = Leases(clock, config.cache.lease)
        self.readers = Readers()
        self._routes = {route.namespace: route.name for route in config.routes}
        self.evictor = Evictor(config, data_dir, contents, store, metrics, clock,
                               self.protected)
        self.disk = DiskFull(metrics, clock)
        self.disk.make_room = self.evictor.make_room  # full disk: evict, then retry once
        self.blobs = Blobs(store, index, contents, self.evictor, self.readers, metrics,
                           lambda: spool.path, disk=self.disk, coordinator=self.coordinator,
                           clock=clock)
        self.manifests = Manifests(store, index, contents, self.leases, metrics, clock,
                                   disk=self.disk, coordinator=self.coordinator)
        self.manifests.declared = self.blobs.sizes.declare  # a cold blob's parts start at once
        self.evictor.on_evicted(self._forget)
        if not isinstance(self.coordinator, InProcess):
            self.evictor.look_every = SHARED_LOOK

    def reconfigure(self, config: Config) -> None:
        """A reload swapped `config` in: new lease time, route namespaces, pins, limits.
        Pushed once at the swap (not read through a getter) so the tables derived from it
        are rebuilt once, and the evictor looks again at once: limits may have shrunk."""
        self.config = config
        self.leases.seconds = config.cache.lease
        self._routes = {route.namespace: route.name for route in config.routes}
        self.evictor.reconfigure(config)

    def protected(self, root: Root) -> bool:
        """Never evicted: a blob being read, a manifest within its lease (and all it
        holds), a pinned image."""
        for entry in root.frees:
            if entry.kind == "blob" and self.readers.busy(entry.namespace, entry.digest):
                return True
            if entry.kind == "manifest" and self.leases.held(entry.namespace, entry.digest):
                return True
        route = self._routes.get(root.entry.namespace, root.entry.namespace)
        return any(pin.matches(route, repository, [t for r, t in root.tags if r == repository],
                               root.entry.digest)
                   for pin in self.config.pins for repository in root.repositories)

    async def _forget(self, entry: Entry) -> None:
        if entry.kind == "manifest":
            self.manifests.forget(entry.namespace, entry.digest)
        else:
            self.blobs.forget(entry.namespace, entry.digest)
            await self.index.forget_blob((entry.namespace, entry.digest))

    async def open(self) -> None:
        """Take our spool directory (removing what dead processes left in theirs), open
        the catalogue, start evicting."""
        swept = await asyncio.to_thread(self.spool.open)
        if swept:
            log.info("removed %d spool leftovers of stopped gateway processes", len(swept))
        await self.contents.open()
        await self.coordinator.open(sweep=self.primary)
        if self.primary:
            self.evictor.start()
            self.evictor.wake()  # the limits may have shrunk since the last run

    async def close(self) -> None:
        await self.evictor.close()
        await self.blobs.flights.close()
        await self.manifests.revalidating.close()
        await self.manifests.calls.close()
        await self.contents.close()
        await self.coordinator.close()
        await asyncio.to_thread(self.spool.close)
