"""The cache: manifests and blobs by digest (immutable), tags → digest (TTL, stale-if-error).

One in-flight fetch per key; every request for the same key joins it. Nothing is
kept unless its digest and length were verified, and a cache hit never crosses
upstreams (each route has its own namespace in the store).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
from cachetools import LRUCache, TLRUCache

from ..config import Route
from ..errors import RegistryError, UpstreamError
from ..metrics import Metrics
from ..reference import Digest, parse_digest
from ..upstream import INDEX_TYPES, MANIFEST_TYPES, Upstream, manifest_accept
from .flight import BlobFlight, FetchAborted, IntegrityError
from .store import BlobStore

__all__ = ["BlobFlight", "Cache", "CachedBlob", "FetchAborted", "Manifest", "ManifestResult"]

MANIFEST_MAX = 4 << 20  # distribution's limit on a manifest's size
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ManifestResult:
    manifest: Manifest
    cache: str  # HIT | MISS | STALE | COALESCED


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    media_type: str
    checked: float  # wall clock of the last upstream confirmation

    def encode(self) -> bytes:
        return json.dumps({"digest": self.digest, "media_type": self.media_type,
                           "checked": self.checked}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> TagEntry | None:
        try:
            data = json.loads(raw)
            return cls(str(data["digest"]), str(data["media_type"]), float(data["checked"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class CachedBlob:
    path: Path
    size: int


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether a client's Accept header admits a cached manifest's media type."""
    if not accept:
        return True
    types = {part.split(";", 1)[0].strip() for part in accept.split(",")}
    return media_type in types or "*/*" in types or len(types - {""}) == 0


def _blob_key(route: Route, digest: Digest) -> str:
    return f"{route.namespace}/blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def _manifest_key(route: Route, digest: Digest) -> str:
    return f"{route.namespace}/manifests/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


# A tag is cached per "view". WIDE: the answer to a client that takes an index (the
# canonical one, shared by every client that accepts its type). NARROW: the answer to a
# client that takes no index, which the upstream may have negotiated down to one
# platform's manifest; it must never reach a client that could have had the index.
WIDE, NARROW = "_tags", "_narrow"  # folder names: repository components start [a-z0-9]


def _view(accept: str | None) -> str:
    negotiated = manifest_accept(accept)
    return WIDE if all(t in negotiated for t in INDEX_TYPES) else NARROW


def _tag_key(route: Route, repository: str, tag: str, view: str) -> str:
    return f"{route.namespace}/tags/{repository}/{view}/{tag}"


def _open_with_size(path: Path) -> tuple[IO[bytes], int]:
    file = open(path, "rb")  # noqa: SIM115  (the caller closes it after sending)
    return file, os.fstat(file.fileno()).st_size


class Cache:
    def __init__(self, store: BlobStore, metrics: Metrics, *,
                 manifest_memory: int = 64 << 20) -> None:
        self.store = store
        self.metrics = metrics
        self._manifests: LRUCache[tuple[str, str], Manifest] = LRUCache(
            maxsize=manifest_memory, getsizeof=lambda m: len(m.body) + 200)
        self._tags: LRUCache[tuple[str, str, str, str], TagEntry] = LRUCache(maxsize=200_000)
        self._blob_sizes: LRUCache[tuple[str, str], int] = LRUCache(maxsize=500_000)
        self._negative: TLRUCache[tuple[str, str, str], float] = TLRUCache(
            maxsize=100_000, ttu=lambda _k, ttl, now: now + ttl, timer=time.monotonic)
        self._flights: dict[tuple[str, str], BlobFlight] = {}
        self._manifest_flights: dict[tuple[Any, ...], asyncio.Task[ManifestResult]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ plumbing

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start a task the cache owns: it outlives the request that began it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _joined(self, key: tuple[Any, ...],
                      make: Callable[[], Awaitable[ManifestResult]]) -> ManifestResult:
        """Single flight for manifests: one upstream call per key, shared by all callers."""
        task = self._manifest_flights.get(key)
        if task is not None:
            result = await asyncio.shield(task)
            return ManifestResult(result.manifest, "COALESCED" if result.cache == "MISS"
                                  else result.cache)

        async def run() -> ManifestResult:
            try:
                return await make()
            finally:
                self._manifest_flights.pop(key, None)

        task = self._spawn(run())
        self._manifest_flights[key] = task
        return await asyncio.shield(task)

    # ------------------------------------------------------------ manifests

    async def _local_manifest(self, route: Route, digest: str) -> Manifest | None:
        key = (route.namespace, digest)
        manifest = self._manifests.get(key)
        if manifest is not None:
            return manifest
        raw = await self.store.read(_manifest_key(route, parse_digest(digest)))
        if raw is None:
            return None
        media_type, _, body = raw.partition(b"\n")
        manifest = Manifest(digest, media_type.decode(), body)
        self._manifests[key] = manifest
        return manifest

    async def _keep_manifest(self, route: Route, manifest: Manifest) -> None:
        data = manifest.media_type.encode() + b"\n" + manifest.body
        await self.store.write(_manifest_key(route, parse_digest(manifest.digest)), data)
        self._manifests[(route.namespace, manifest.digest)] = manifest

    async def _tag(self, route: Route, repository: str, tag: str, view: str) -> TagEntry | None:
        key = (route.namespace, repository, tag, view)
        entry = self._tags.get(key)
        if entry is None:
            raw = await self.store.read(_tag_key(route, repository, tag, view))
            entry = TagEntry.decode(raw) if raw is not None else None
            if entry is not None:
                self._tags[key] = entry
        return entry

    async def _keep_tag(self, route: Route, repository: str, tag: str, view: str,
                        entry: TagEntry) -> None:
        self._tags[(route.namespace, repository, tag, view)] = entry
        await self.store.write(_tag_key(route, repository, tag, view), entry.encode())

    async def _fetch_manifest(self, upstream: Upstream, route: Route, repository: str,
                              reference: str, accept: str | None,
                              want: Digest | None) -> Manifest:
        """GET a manifest upstream and verify it; raise rather than return anything doubtful."""
        headers = {"Accept": manifest_accept(accept)}
        resp = await upstream.request("GET", f"/v2/{repository}/manifests/{reference}",
                                      kind="manifest", repository=repository, headers=headers)
        body = await upstream.read_body(resp, MANIFEST_MAX, "manifest")
        if resp.content_length is not None and len(body) != resp.content_length:
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise IntegrityError(f"manifest {reference}: upstream sent {len(body)} of "
                                 f"{resp.content_length} bytes")
        try:
            parsed = json.loads(body)
        except ValueError:
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise RegistryError("MANIFEST_INVALID",
                                f"upstream {route.name} sent a manifest that is not JSON",
                                502) from None
        algorithm = want.algorithm if want is not None else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        claimed = resp.headers.get("Docker-Content-Digest")
        if (want is not None and digest != str(want)) or (
                claimed and claimed.startswith(algorithm + ":") and claimed != digest):
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise IntegrityError(f"manifest {reference}: upstream bytes hash to {digest}")
        media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if media_type not in MANIFEST_TYPES and isinstance(parsed, dict) and \
                isinstance(parsed.get("mediaType"), str):
            media_type = parsed["mediaType"]
        return Manifest(digest, media_type or "application/json", body)

    async def manifest(self, upstream: Upstream, route: Route, repository: str, reference: str,
                       accept: str | None) -> ManifestResult:
        if ":" in reference:
            return await self._manifest_by_digest(upstream, route, repository,
                                                  parse_digest(reference), accept)
        return await self._manifest_by_tag(upstream, route, repository, reference, accept)

    async def _manifest_by_digest(self, upstream: Upstream, route: Route, repository: str,
                                  digest: Digest, accept: str | None) -> ManifestResult:
        cached = await self._local_manifest(route, str(digest))
        if cached is not None:
            self.metrics.cache.labels(route.name, "manifest", "hit").inc()
            return ManifestResult(cached, "HIT")
        self._check_negative(route, repository, str(digest))

        async def fetch() -> ManifestResult:
            manifest = await self._remember_missing(
                route, repository, str(digest),
                self._fetch_manifest(upstream, route, repository, str(digest), accept, digest))
            await self._keep_manifest(route, manifest)
            return ManifestResult(manifest, "MISS")

        # Existence is per repository upstream, so the repository is part of the key.
        result = await self._joined((route.namespace, "digest", repository, str(digest)), fetch)
        self.metrics.cache.labels(route.name, "manifest", result.cache.lower()).inc()
        return result

    async def _manifest_by_tag(self, upstream: Upstream, route: Route, repository: str,
                               tag: str, accept: str | None) -> ManifestResult:
        view = _view(accept)
        entry = await self._tag(route, repository, tag, WIDE)
        if view == NARROW and not (entry is not None and accepts(accept, entry.media_type)):
            entry = await self._tag(route, repository, tag, NARROW)
        usable = entry is not None and accepts(accept, entry.media_type)
        if entry is not None and usable and time.time() - entry.checked < route.tag_ttl:
            cached = await self._local_manifest(route, entry.digest)
            if cached is not None:
                self.metrics.cache.labels(route.name, "tag", "hit").inc()
                return ManifestResult(cached, "HIT")
        self._check_negative(route, repository, tag)

        async def refresh() -> ManifestResult:
            return await self._refresh_tag(upstream, route, repository, tag, accept, view,
                                           entry if usable else None)

        result = await self._joined((route.namespace, "tag", repository, tag, accept or ""),
                                    refresh)
        self.metrics.cache.labels(route.name, "tag", result.cache.lower()).inc()
        return result

    def _check_negative(self, route: Route, repository: str, reference: str) -> None:
        if (route.namespace, repository, reference) in self._negative:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {repository}@{reference} not "
                                f"found at upstream {route.name} (remembered)")

    async def _remember_missing(self, route: Route, repository: str, reference: str,
                                fetch: Awaitable[T]) -> T:
        """Await `fetch`; an upstream 404 is remembered for the route's negative_ttl so a
        crash-looping deployment does not hammer the upstream."""
        try:
            return await fetch
        except UpstreamError as exc:
            if exc.upstream_status == 404 and route.negative_ttl > 0:
                self._negative[(route.namespace, repository, reference)] = route.negative_ttl
            raise

    async def _refresh_tag(self, upstream: Upstream, route: Route, repository: str, tag: str,
                           accept: str | None, view: str,
                           entry: TagEntry | None) -> ManifestResult:
        cached = await self._local_manifest(route, entry.digest) if entry else None
        path = f"/v2/{repository}/manifests/{tag}"
        headers = {"Accept": manifest_accept(accept)}
        try:
            if entry is not None and cached is not None:
                # A HEAD does not count against Docker Hub's pull limit; only a new digest GETs.
                resp = await upstream.request("HEAD", path, kind="manifest",
                                              repository=repository, headers=headers)
                resp.release()
                if resp.headers.get("Docker-Content-Digest") == entry.digest:
                    await self._keep_tag(route, repository, tag, view,
                                         TagEntry(entry.digest, entry.media_type, time.time()))
                    return ManifestResult(cached, "HIT")
            manifest = await self._fetch_manifest(upstream, route, repository, tag, accept, None)
        except UpstreamError as exc:
            if exc.upstream_status == 404:
                if route.negative_ttl > 0:
                    self._negative[(route.namespace, repository, tag)] = route.negative_ttl
                raise
            if exc.retryable and entry is not None and cached is not None and \
                    time.time() - entry.checked < route.tag_ttl + route.stale_if_error:
                self.metrics.stale_served.labels(route.name).inc()
                return ManifestResult(cached, "STALE")
            raise
        await self._keep_manifest(route, manifest)
        if accepts(accept, manifest.media_type):
            await self._keep_tag(route, repository, tag, view,
                                 TagEntry(manifest.digest, manifest.media_type, time.time()))
        return ManifestResult(manifest, "MISS")

    # ---------------------------------------------------------------- blobs

    async def cached_blob(self, route: Route, digest: Digest, *,
                          check_disk: bool = True) -> CachedBlob | None:
        """The committed blob, if any. `check_disk=False` trusts the in-memory record
        (HEAD); a GET looks at the disk, so a file deleted behind our back is fetched
        again rather than answered with a 404 that says HIT."""
        key = _blob_key(route, digest)
        path = self.store.local_path(key)
        if path is None:
            return None
        memo = (route.namespace, str(digest))
        size = self._blob_sizes.get(memo) if not check_disk else None
        if size is None:
            size = await self.store.stat(key)
            if size is None:
                self._blob_sizes.pop(memo, None)
                return None
            self._blob_sizes[memo] = size
        return CachedBlob(path, size)

    async def open_cached_blob(self, route: Route,
                               digest: Digest) -> tuple[IO[bytes], int] | None:
        """The committed blob opened for reading, with its size: one thread hop, which
        also proves the file is still there."""
        path = self.store.local_path(_blob_key(route, digest))
        if path is None:
            return None
        try:
            return await asyncio.to_thread(_open_with_size, path)
        except FileNotFoundError:
            self._blob_sizes.pop((route.namespace, str(digest)), None)
            return None

    async def forget_blob(self, route: Route, digest: Digest) -> None:
        """Delete a cached blob (eviction, repair); the next GET fetches it again."""
        self._blob_sizes.pop((route.namespace, str(digest)), None)
        await self.store.delete(_blob_key(route, digest))

    async def blob(self, upstream: Upstream, route: Route, repository: str,
                   digest: Digest) -> CachedBlob | tuple[BlobFlight, bool]:
        """The cached blob, or its in-flight fetch (started if needed: then True)."""
        cached = await self.cached_blob(route, digest)
        if cached is not None:
            return cached
        # A fetch may have committed while we looked at the disk: its size is memoised
        # before it leaves _flights, so this synchronous check closes the gap.
        size = self._blob_sizes.get((route.namespace, str(digest)))
        path = self.store.local_path(_blob_key(route, digest))
        if size is not None and path is not None:
            return CachedBlob(path, size)
        return self.flight(upstream, route, repository, digest)

    def flight(self, upstream: Upstream, route: Route, repository: str,
               digest: Digest) -> tuple[BlobFlight, bool]:
        """The in-flight fetch of a blob, started if needed; True if this call started it."""
        key = (route.namespace, str(digest))
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        store_key = _blob_key(route, digest)
        spool = self.store.spool_dir / f"{digest.hex}.{uuid.uuid4().hex[:8]}"
        flight = BlobFlight(digest, spool, self.store.local_path(store_key),
                            orphan_limit=route.orphan_fetch_limit)
        self._flights[key] = flight
        path = f"/v2/{repository}/blobs/{digest}"

        async def open_upstream(headers: dict[str, str]) -> aiohttp.ClientResponse:
            return await upstream.request("GET", path, kind="blob", repository=repository,
                                          headers=headers)

        async def commit(spool: Path) -> None:
            await self.store.commit(store_key, spool)
            self._blob_sizes[key] = flight.written

        async def run() -> None:
            gauge = self.metrics.inflight.labels(route.name)
            gauge.inc()
            try:
                await flight.run(
                    open_upstream, commit,
                    on_bytes=self.metrics.upstream_bytes.labels(route.name).inc,
                    on_resume=self.metrics.resumed.labels(route.name).inc)
                if isinstance(flight.error, IntegrityError):
                    self.metrics.integrity_failures.labels(route.name, "blob").inc()
            finally:
                gauge.dec()
                self._flights.pop(key, None)

        self._spawn(run())
        return flight, True

    def inflight(self, route: Route, digest: Digest) -> BlobFlight | None:
        return self._flights.get((route.namespace, str(digest)))
