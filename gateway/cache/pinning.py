"""Pinned images kept cached and fresh: every pin that names one tag or digest is
fetched at start and again every `tag_ttl` of its route (only the platforms it names),
through the same single flight as clients. Eviction skips pinned images (core.py).
"""

from __future__ import annotations

import asyncio
import json
import logging

from ..config import Config, Pin
from ..errors import RegistryError
from ..metrics import Metrics
from ..oci import MANIFEST_TYPES, index_entries, references
from ..reference import Reference, parse_digest
from ..tasks import Background
from ..upstream import Upstream
from .core import Cache
from .manifests import Manifest

log = logging.getLogger("gateway.pins")
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)
MIN_INTERVAL = 30.0


class PinKeeper:
    def __init__(self, config: Config, cache: Cache, upstreams: dict[str, Upstream],
                 metrics: Metrics) -> None:
        self._pins = [pin for pin in config.pins if pin.reference is not None]
        self._config = config
        self._cache = cache
        self._upstreams = upstreams
        self._metrics = metrics
        self._task = Background("pins")
        ttls = [config.route(pin.route).cache.tag_ttl for pin in self._pins]
        self.interval = max(min(ttls, default=MIN_INTERVAL), MIN_INTERVAL)

    def start(self) -> None:
        if self._pins:
            self._task.start(self._run())

    async def close(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        while True:
            await self.keep_all()
            await asyncio.sleep(self.interval)

    async def keep_all(self) -> None:
        pinned: dict[str, int] = {}
        for pin in self._pins:
            try:
                size = await self.keep(pin)
            except (RegistryError, OSError) as exc:  # the next round tries again
                log.warning("pin %s: %s", pin.text, exc)
                continue
            pinned[pin.route] = pinned.get(pin.route, 0) + size
        for route, size in pinned.items():
            self._metrics.pinned_bytes.labels(route).set(size)

    async def keep(self, pin: Pin) -> int:
        """Fetch the pinned image (what is cached costs nothing); the bytes it holds."""
        assert pin.reference is not None
        route = self._config.route(pin.route)
        upstream = self._upstreams[pin.route]
        top = await self._manifest(pin, pin.reference)
        manifests = [top]
        document = json.loads(top.body)
        for digest in index_entries(document, pin.platforms):
            manifests.append(await self._manifest(pin, digest))
        size = sum(len(m.body) for m in manifests)
        for manifest in manifests:
            for kind, digest in references(json.loads(manifest.body)):
                if kind == "blob":
                    size += await self._blob(route.name, upstream, pin, digest)
        return size

    async def _manifest(self, pin: Pin, reference: str) -> Manifest:
        route = self._config.route(pin.route)
        result = await self._cache.manifests.get(
            self._upstreams[pin.route], route, pin.repository, Reference.parse(reference),
            ACCEPT_ALL)
        return result.manifest

    async def _blob(self, route_name: str, upstream: Upstream, pin: Pin, digest: str) -> int:
        route = self._config.route(route_name)
        parsed = parse_digest(digest)
        size = await self._cache.blobs.cached_size(route, parsed)
        if size is not None:
            return size
        flight, _ = self._cache.blobs.fetch(upstream, route, pin.repository, parsed)
        with flight.attached():  # a reader: the orphan limit must not drop it
            if not await flight.finished():
                raise RegistryError("UNAVAILABLE", f"blob {digest} did not arrive verified")
        return flight.written
