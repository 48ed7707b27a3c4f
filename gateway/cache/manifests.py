"""Manifests: by digest (immutable, verified against the digest), and tags → digest
(revalidated with a HEAD after their TTL, served stale when the upstream fails, or at once
while one background HEAD revalidates them: stale_while_revalidate).

One upstream call per key however many clients ask at once; never keeps or serves a
manifest whose bytes do not hash to the digest the upstream or the client named. One the
disk has no room for (ENOSPC, EDQUOT) is served all the same, just not kept on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cachetools import LRUCache, TTLCache

from ..config import Route
from ..errors import RegistryError, UpstreamError
from ..metrics import Metrics
from ..oci import (
    MANIFEST_MAX,
    MANIFEST_TYPES,
    SCHEMA1_TYPES,
    declared_sizes,
    manifest_accept,
    references,
    served_type,
)
from ..reference import Digest, Reference, parse_digest
from ..singleflight import SharedCalls, SingleFlight
from ..upstream import Upstream
from . import policy
from .contents import Contents
from .coordinate import Coordinator, InProcess
from .diskfull import DiskFull, What, is_no_space
from .flight import IntegrityError
from .index import Index, TagKey
from .leases import Leases
from .policy import TagEntry, View
from .store import BlobStore, manifest_key, tag_key

T = TypeVar("T")
# A tag's view looked for in the store and not there is not looked for again this long.
# A client that takes no index asks for the WIDE view first (the canonical answer); where
# only its NARROW one is kept, each of its GETs would otherwise open a missing file in a
# thread. Another process that stores the view meanwhile is seen this much later.
ABSENT_RECHECK = 1.0
ABSENT_KEPT = 4096  # views remembered as absent, per process
log = logging.getLogger("gateway.cache")


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class ManifestResult:
    manifest: Manifest
    cache: str  # HIT | MISS | STALE | COALESCED


class Manifests:
    def __init__(self, store: BlobStore, index: Index, contents: Contents, leases: Leases,
                 metrics: Metrics, clock: Callable[[], float], *,
                 memory: int = 64 << 20, disk: DiskFull | None = None,
                 coordinator: Coordinator | None = None) -> None:
        self.store = store
        self.index = index
        self.contents = contents
        self.leases = leases
        self.metrics = metrics
        self._clock = clock
        self.disk = disk if disk is not None else DiskFull(metrics, time.time)
        self._memory: LRUCache[tuple[str, str], Manifest] = LRUCache(
            maxsize=memory, getsizeof=lambda m: len(m.body) + 200)
        self._absent: TTLCache[TagKey, bool] = TTLCache(
            maxsize=ABSENT_KEPT, ttl=ABSENT_RECHECK, timer=clock)
        self.calls: SharedCalls[tuple[Any, ...], ManifestResult] = SharedCalls("manifest")
        # Background revalidations (stale-while-revalidate), one per tag; closed with the cache.
        self.revalidating: SingleFlight[tuple[Any, ...], None] = SingleFlight("revalidate")
        # One upstream call per key across the processes on this store too.
        self.coordinator: Coordinator = coordinator or InProcess()
        # Told the blob sizes a manifest fetched upstream declares (Blobs.declare).
        self.declared: Callable[[str, list[tuple[str, int]]], None] = lambda _ns, _sizes: None

    # ------------------------------------------------------------ storage

    async def local(self, route: Route, digest: str) -> Manifest | None:
        key = (route.namespace, digest)
        manifest = self._memory.get(key)
        if manifest is not None:
            return manifest
        raw = await self.store.get(manifest_key(route.namespace, parse_digest(digest)))
        if raw is None:
            return None
        media_type, _, body = raw.partition(b"\n")
        manifest = Manifest(digest, media_type.decode(), body)
        self._memory[key] = manifest
        return manifest

    async def _keep(self, route: Route, repository: str, manifest: Manifest) -> None:
        data = manifest.media_type.encode() + b"\n" + manifest.body
        # Memory first: with the disk full, it still spares the upstream the next GET.
        self._memory[(route.namespace, manifest.digest)] = manifest
        document = json.loads(manifest.body)
        self.declared(route.namespace, declared_sizes(document))
        if await self._put(route, "manifest", manifest.digest,
                           manifest_key(route.namespace, parse_digest(manifest.digest)), data):
            await self.contents.add_manifest(route.namespace, manifest.digest, len(data),
                                             repository, references(document))

    def forget(self, namespace: str, digest: str) -> None:
        """An evicted manifest: the next request reads the store (and finds it gone)."""
        self._memory.pop((namespace, digest), None)

    async def _put(self, route: Route, what: What, name: str, key: str, data: bytes) -> bool:
        """Keep a small object; False if the disk is full (it is served all the same)."""
        try:
            await self.store.put(key, data)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self.disk.event(route.name, what, exc, f"writing the {what} {name}",
                            "served, not kept on disk")
            return False
        return True

    async def _tag(self, key: TagKey) -> TagEntry | None:
        entry = await self.index.tag(key)
        if entry is None and key not in self._absent:
            raw = await self.store.get(tag_key(*key))
            entry = TagEntry.decode(raw) if raw is not None else None
            if entry is not None:
                await self.index.set_tag(key, entry)
            else:
                self._absent[key] = True
        return entry

    async def _keep_tag(self, route: Route, key: TagKey, entry: TagEntry) -> None:
        self._absent.pop(key, None)
        await self.index.set_tag(key, entry)
        if await self._put(route, "tag", f"{key[1]}:{key[2]}", tag_key(*key), entry.encode()):
            await self.contents.add_tag(key[0], key[1], key[2], entry.digest, view=key[3])

    # ------------------------------------------------------------ upstream

    async def _fetch(self, upstream: Upstream, route: Route, repository: str, reference: str,
                     accept: str | None, want: Digest | None) -> Manifest:
        """GET a manifest upstream and verify it; raise rather than return anything doubtful."""
        resp = await upstream.request("GET", f"/v2/{repository}/manifests/{reference}",
                                      kind="manifest", repository=repository,
                                      headers={"Accept": manifest_accept(accept)})
        media_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
        claimed = resp.headers.get("Docker-Content-Digest")
        length = resp.content_length
        body = await upstream.read_body(resp, MANIFEST_MAX, "manifest")
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        _refuse_schema1(media_type, parsed, repository, reference)
        if length is not None and len(body) != length:
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise IntegrityError(f"manifest {reference}: upstream sent {len(body)} of "
                                 f"{length} bytes")
        if parsed is None:
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise RegistryError("MANIFEST_INVALID",
                                f"upstream {route.name} sent a manifest that is not JSON", 502)
        algorithm = want.algorithm if want is not None else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        if (want is not None and digest != str(want)) or (
                claimed and claimed.startswith(algorithm + ":") and claimed != digest):
            self.metrics.integrity_failures.labels(route.name, "manifest").inc()
            raise IntegrityError(f"manifest {reference}: upstream bytes hash to {digest}")
        return Manifest(digest, served_type(media_type, parsed), body)

    async def _remember_missing(self, route: Route, repository: str, reference: str,
                                fetch: Awaitable[T]) -> T:
        """Await `fetch`; an upstream 404 is remembered for the route's negative_ttl so a
        crash-looping deployment does not hammer the upstream."""
        try:
            return await fetch
        except UpstreamError as exc:
            if exc.upstream_status == 404:
                await self.index.set_missing((route.namespace, repository, reference),
                                             route.cache.negative_ttl)
            raise

    async def _check_missing(self, route: Route, repository: str, reference: str) -> None:
        if await self.index.missing((route.namespace, repository, reference)):
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest {repository}@{reference} not "
                                f"found at upstream {route.name} (remembered)")

    # ------------------------------------------------------------ the two lookups

    async def get(self, upstream: Upstream, route: Route, repository: str,
                  reference: Reference, accept: str | None, *,
                  admit: Callable[[], None] | None = None) -> ManifestResult:
        """`admit()` is called (and may raise) before the answer needs the upstream, unless
        a call for it is under way already (shared: no extra upstream request)."""
        if reference.digest is not None:
            result = await self._by_digest(upstream, route, repository, reference.digest,
                                           accept, admit)
            kind = "manifest"
        else:
            assert reference.tag is not None
            result = await self._by_tag(upstream, route, repository, reference.tag, accept,
                                        admit)
            kind = "tag"
        return self._served(route, kind, result)

    def held(self, route: Route, repository: str, reference: Reference,
             accept: str | None) -> ManifestResult | None:
        """`get()`'s answer when it is a HIT this process holds in memory (no I/O, no
        upstream, no wait), with the same bookkeeping; None: ask `get()`."""
        if reference.digest is not None:
            manifest = self._memory.get((route.namespace, str(reference.digest)))
            kind = "manifest"
        else:
            assert reference.tag is not None
            wide = (route.namespace, repository, reference.tag, policy.WIDE)
            entry = self.index.held_tag(wide)
            if entry is None and wide not in self._absent:
                return None  # get() looks in the store first: another process may have it
            if policy.view(accept) == policy.NARROW and not policy.usable(entry, accept):
                entry = self.index.held_tag((route.namespace, repository, reference.tag,
                                             policy.NARROW))
            if entry is None or not policy.usable(entry, accept) or \
                    not policy.fresh(entry, route.cache, self._clock()):
                return None
            manifest = self._memory.get((route.namespace, entry.digest))
            kind = "tag"
        if manifest is None:
            return None
        return self._served(route, kind, ManifestResult(manifest, "HIT"))

    def _served(self, route: Route, kind: str, result: ManifestResult) -> ManifestResult:
        self.metrics.cache_outcome(route.name, kind, result.cache.lower())
        # Served: its blobs stay for the lease, and it counts as used now.
        self.leases.grant(route.namespace, result.manifest.digest)
        self.contents.touch(route.namespace, "manifest", result.manifest.digest)
        return result

    async def _shared(self, key: tuple[Any, ...],
                      compute: Callable[[], Awaitable[ManifestResult]],
                      admit: Callable[[], None] | None) -> ManifestResult:
        if admit is not None and not self.calls.running(key):
            admit()
        result, started = await self.calls.call(key, compute)
        if not started and result.cache == "MISS":
            return ManifestResult(result.manifest, "COALESCED")
        return result

    async def _by_digest(self, upstream: Upstream, route: Route, repository: str,
                         digest: Digest, accept: str | None,
                         admit: Callable[[], None] | None) -> ManifestResult:
        cached = await self.local(route, str(digest))
        if cached is not None:
            return ManifestResult(cached, "HIT")
        await self._check_missing(route, repository, str(digest))

        async def fetch() -> ManifestResult:
            async with self.coordinator.turn(
                    f"manifest {route.namespace} {repository} {digest}") as waited:
                if waited:  # another process had it: it may be in the store now
                    cached = await self.local(route, str(digest))
                    if cached is not None:
                        return ManifestResult(cached, "COALESCED")
                with upstream.in_use():  # it may outlive the request: a reload waits for it
                    manifest = await self._remember_missing(
                        route, repository, str(digest),
                        self._fetch(upstream, route, repository, str(digest), accept, digest))
                await self._keep(route, repository, manifest)
            return ManifestResult(manifest, "MISS")

        # Existence is per repository upstream, so the repository is part of the key.
        return await self._shared((route.namespace, "digest", repository, str(digest)), fetch,
                                  admit)

    async def _by_tag(self, upstream: Upstream, route: Route, repository: str, tag: str,
                      accept: str | None, admit: Callable[[], None] | None) -> ManifestResult:
        view = policy.view(accept)
        entry = await self._tag((route.namespace, repository, tag, policy.WIDE))
        if view == policy.NARROW and not policy.usable(entry, accept):
            entry = await self._tag((route.namespace, repository, tag, policy.NARROW))
        usable = entry if policy.usable(entry, accept) else None
        now = self._clock()
        if usable is not None and policy.fresh(usable, route.cache, now):
            cached = await self.local(route, usable.digest)
            if cached is not None:
                return ManifestResult(cached, "HIT")
        await self._check_missing(route, repository, tag)

        async def refresh() -> ManifestResult:
            async with self.coordinator.turn(
                    f"tag {route.namespace} {repository} {tag} {accept or ''}") as waited:
                if waited:  # another process had it: it may have refreshed the tag
                    done = await self._refreshed_elsewhere(route, repository, tag, accept)
                    if done is not None:
                        return done
                with upstream.in_use():
                    return await self._refresh(upstream, route, repository, tag, accept,
                                               view, usable)

        key = (route.namespace, "tag", repository, tag, accept or "")
        if usable is not None and policy.revalidate_in_background(usable, route.cache, now):
            cached = await self.local(route, usable.digest)
            if cached is not None:
                self._revalidate(route, key, refresh)
                return ManifestResult(cached, "STALE")
        return await self._shared(key, refresh, admit)

    async def _refreshed_elsewhere(self, route: Route, repository: str, tag: str,
                                   accept: str | None) -> ManifestResult | None:
        """The tag as another process just stored it, if fresh (the store, not the
        index of this process, which may hold what it knew before)."""
        for view in dict.fromkeys((policy.WIDE, policy.view(accept))):
            key: TagKey = (route.namespace, repository, tag, view)
            raw = await self.store.get(tag_key(*key))
            entry = TagEntry.decode(raw) if raw is not None else None
            if entry is None or not policy.usable(entry, accept) or \
                    not policy.fresh(entry, route.cache, self._clock()):
                continue
            cached = await self.local(route, entry.digest)
            if cached is not None:
                await self.index.set_tag(key, entry)
                return ManifestResult(cached, "COALESCED")
        return None

    def _revalidate(self, route: Route, key: tuple[Any, ...],
                    refresh: Callable[[], Awaitable[ManifestResult]]) -> None:
        """Revalidate a tag behind the answer: one task per tag (sharing the refresh of a
        client that asks past the window), owned here and cancelled at close."""

        async def work() -> None:
            try:
                result, _started = await self.calls.call(key, refresh)
            except Exception as exc:  # nobody awaits this task: count and log
                log.info("revalidating tag %s of %s failed: %s", key[3], route.name, exc)
                outcome = "failed"
            else:
                outcome = {"MISS": "changed", "HIT": "unchanged", "COALESCED": "unchanged"}.get(
                    result.cache, "failed")
            self.metrics.revalidations.labels(route.name, outcome).inc()

        self.revalidating.join(key, lambda: (None, work()))

    async def _refresh(self, upstream: Upstream, route: Route, repository: str, tag: str,
                       accept: str | None, view: View, entry: TagEntry | None) -> ManifestResult:
        cached = await self.local(route, entry.digest) if entry else None
        key: TagKey = (route.namespace, repository, tag, view)
        try:
            if entry is not None and cached is not None:
                # A HEAD does not count against Docker Hub's pull limit; only a new digest GETs.
                resp = await upstream.request(
                    "HEAD", f"/v2/{repository}/manifests/{tag}", kind="manifest",
                    repository=repository, headers={"Accept": manifest_accept(accept)})
                resp.release()
                if resp.headers.get("Docker-Content-Digest") == entry.digest:
                    await self._keep_tag(route, key, entry.confirmed(self._clock()))
                    return ManifestResult(cached, "HIT")
            manifest = await self._fetch(upstream, route, repository, tag, accept, None)
        except UpstreamError as exc:
            if exc.upstream_status == 404:
                await self.index.set_missing((route.namespace, repository, tag),
                                             route.cache.negative_ttl)
                raise
            if exc.retryable and entry is not None and cached is not None and \
                    policy.may_serve_stale(entry, route.cache, self._clock()):
                self.metrics.stale_served.labels(route.name).inc()
                return ManifestResult(cached, "STALE")
            raise
        await self._keep(route, repository, manifest)
        if policy.usable(TagEntry(manifest.digest, manifest.media_type, 0), accept):
            await self._keep_tag(route, key, TagEntry(manifest.digest, manifest.media_type,
                                                      self._clock()))
        return ManifestResult(manifest, "MISS")


def _refuse_schema1(media_type: str, parsed: object, repository: str, reference: str) -> None:
    """distribution converts to signed schema1 when the Accept leaves nothing else (only an
    index type, or only schema1): the client's choice, not a corrupt upstream."""
    if media_type in SCHEMA1_TYPES or (isinstance(parsed, dict)
                                       and parsed.get("schemaVersion") == 1):
        raise RegistryError(
            "MANIFEST_UNKNOWN", f"{repository}:{reference} has no manifest of a type your "
            "Accept header names that this gateway serves (the upstream offered a Docker "
            "schema1 manifest, which is not supported): accept "
            + ", ".join(MANIFEST_TYPES), 404)
