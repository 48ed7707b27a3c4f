"""Pinned images kept cached and fresh: every pin that names one tag or digest is
fetched at start, at once after a reload, and again every `tag_ttl` of its route (only
the platforms it names), through the same single flight as clients. Eviction skips
pinned images (core.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from ..config import Config, Pin, Route
from ..errors import RegistryError
from ..metrics import Metrics
from ..oci import MANIFEST_TYPES, index_entries, references
from ..reference import Reference, parse_digest
from ..tasks import Background
from ..upstream import Upstream
from ..upstream_pool import UpstreamPool
from .core import Cache
from .manifests import Manifest

log = logging.getLogger("gateway.pins")
ACCEPT_ALL = ", ".join(MANIFEST_TYPES)
MIN_INTERVAL = 30.0


class PinKeeper:
    def __init__(self, config: Config, cache: Cache, upstreams: UpstreamPool,
                 metrics: Metrics) -> None:
        self._cache = cache
        self._upstreams = upstreams
        self._metrics = metrics
        self._task = Background("pins")
        self._running = self._started = False
        self._again = asyncio.Event()
        self._configure(config)

    def _configure(self, config: Config) -> None:
        self._pins = [pin for pin in config.pins if pin.reference is not None]
        self._config = config
        ttls = [config.route(pin.route).cache.tag_ttl for pin in self._pins]
        self.interval = max(min(ttls, default=MIN_INTERVAL), MIN_INTERVAL)

    def start(self) -> None:
        self._running = True
        self._start_if_pinned()

    def _start_if_pinned(self) -> None:
        # The task starts with the first pin (at start or by a reload) and runs until close.
        if self._running and self._pins and not self._started:
            self._started = True
            self._task.start(self._run())

    def reconfigure(self, config: Config) -> None:
        """A reload: the pins of `config`, fetched again at once (new pins, new tags)."""
        self._configure(config)
        self._start_if_pinned()
        self._again.set()

    async def close(self) -> None:
        self._running = False
        await self._task.stop()
        self._started = False

    async def _run(self) -> None:
        while True:
            self._again.clear()
            await self.keep_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._again.wait(), self.interval)

    async def keep_all(self) -> None:
        pinned: dict[str, int] = {}
        config, pins = self._config, self._pins  # one round, one config (a reload may come)
        for pin in pins:
            try:
                size = await self.keep(pin, config)
            except (RegistryError, OSError) as exc:  # the next round tries again
                log.warning("pin %s: %s", pin.text, exc)
                continue
            pinned[pin.route] = pinned.get(pin.route, 0) + size
        for route, size in pinned.items():
            self._metrics.pinned_bytes.labels(route).set(size)

    async def keep(self, pin: Pin, config: Config | None = None) -> int:
        """Fetch the pinned image (what is cached costs nothing); the bytes it holds."""
        assert pin.reference is not None
        route = (config or self._config).route(pin.route)
        async with self._upstreams.use(route) as upstream:
            top = await self._manifest(upstream, route, pin, pin.reference)
            manifests = [top]
            document = json.loads(top.body)
            for digest in index_entries(document, pin.platforms):
                manifests.append(await self._manifest(upstream, route, pin, digest))
            size = sum(len(m.body) for m in manifests)
            for manifest in manifests:
                for kind, digest in references(json.loads(manifest.body)):
                    if kind == "blob":
                        size += await self._blob(route, upstream, pin, digest)
        return size

    async def _manifest(self, upstream: Upstream, route: Route, pin: Pin,
                        reference: str) -> Manifest:
        result = await self._cache.manifests.get(
            upstream, route, pin.repository, Reference.parse(reference), ACCEPT_ALL)
        return result.manifest

    async def _blob(self, route: Route, upstream: Upstream, pin: Pin, digest: str) -> int:
        parsed = parse_digest(digest)
        size = await self._cache.blobs.cached_size(route, parsed)
        if size is not None:
            return size
        flight, _ = self._cache.blobs.fetch(upstream, route, pin.repository, parsed)
        with flight.attached():  # a reader: the orphan limit must not drop it
            if not await flight.finished():
                raise RegistryError("UNAVAILABLE", f"blob {digest} did not arrive verified")
        return flight.written
