"""Blobs by digest: what is committed in the store, and the one in-flight fetch of each.

A blob is served from the store (a small one from memory once read and verified), or
followed live from its flight's spool; it is kept only once the flight verified it.
Counts every GET's cache outcome exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol, cast

import aiohttp
from cachetools import LRUCache

from ..config import Route
from ..metrics import Metrics
from ..reference import Digest
from ..singleflight import SingleFlight
from ..upstream import Upstream
from .contents import Contents
from .coordinate import Coordinator, Follow, InProcess, Lead, Sourced
from .diskfull import DiskFull
from .flight import BlobFlight, FetchAborted, IntegrityError
from .follow import follow
from .found import (
    SMALL_BLOB,
    SMALL_MEMORY,
    SMALL_RECHECK,
    CachedBlob,
    MemoryBlob,
    OpenBlob,
    open_local,
    read_whole,
    verified,
)
from .index import BlobKey, Index
from .leases import Readers
from .ranged import DeclaredSizes, Plan, reuse_redirect
from .relay import Relay
from .s3_stream import StreamedUpload
from .store import BlobStore, LocalFiles, Redirecting, SizedReads, blob_key
from .transfer import Opener, blob_length

# Seconds a verified spool outlives its flight in a store without local files: a reader
# that joined the flight opens it within moments.
SPOOL_GRACE = 30.0


class StoredMeanwhile(FetchAborted):
    """Another process committed the blob while this one was about to fetch it; the
    readers of this flight read the store instead (counted once, as what they were)."""


class Space(Protocol):
    """What keeps the disk within its limits (the evictor): told of bytes on their way."""

    def reserve(self, size: int) -> None: ...

    def release(self, size: int) -> None: ...

    def wake(self) -> None: ...


class Blobs:
    def __init__(self, store: BlobStore, index: Index, contents: Contents, space: Space,
                 readers: Readers, metrics: Metrics, scratch: Callable[[], Path], *,
                 disk: DiskFull | None = None, coordinator: Coordinator | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 memory: int | None = None) -> None:
        self.store = store
        self.index = index
        self.contents = contents
        self.space = space
        self.readers = readers
        self.metrics = metrics
        self._scratch = scratch  # the process's spool directory
        self._local = store if isinstance(store, LocalFiles) else None
        # Capabilities, looked up once: isinstance of a runtime Protocol walks its members.
        self.sized_reads = isinstance(store, SizedReads)
        self.redirecting = isinstance(store, Redirecting)
        self._clock = clock
        # Small verified blobs by key, with when the store last had them (SMALL_RECHECK).
        self._small: LRUCache[BlobKey, tuple[MemoryBlob, float]] = LRUCache(
            maxsize=SMALL_MEMORY if memory is None else memory,
            getsizeof=lambda kept: kept[0].size + 200)
        self._forgets = 0  # a read begun before a `forget` must not keep what it read
        self.flights: SingleFlight[BlobKey, BlobFlight] = SingleFlight("blob")
        self.sizes = DeclaredSizes()  # told by the manifests fetched upstream
        self.disk = disk if disk is not None else DiskFull(metrics, time.time)
        # Who fetches a blob other processes on this store want too (cache/coordinate.py).
        self.coordinator: Coordinator = coordinator or InProcess()
        self._shared = not isinstance(self.coordinator, InProcess)
        # Spools of verified blobs in a store without local files, kept a while for the
        # readers that joined their flight but have not opened the spool yet (owned here;
        # what is left at shutdown goes with the process's spool directory).
        self._keeping: set[asyncio.Task[None]] = set()

    def _count(self, route: Route, result: str) -> None:
        self.metrics.cache_outcome(route.name, "blob", result)

    async def _open(self, route: Route, digest: Digest, key: BlobKey,
                    byte_range: str | None = None) -> MemoryBlob | OpenBlob | CachedBlob | None:
        """The committed blob: opened, if the store has local files (one thread hop, which
        also proves the file is there), or its read begun (one GET that also tells the
        size: `byte_range`, the client's Range, is asked for), else as key and size. A
        small one read whole is verified and kept in memory (`get` looks there first)."""
        store_key = blob_key(route.namespace, digest)
        now, forgets = self._clock(), self._forgets
        if self.sized_reads:
            body = await cast(SizedReads, self.store).open_read(store_key, byte_range)
            if body is None:
                return None
            if body.size <= SMALL_BLOB and (body.start, body.end) == (0, body.size):
                data = await read_whole(body)
                if len(data) == body.size and verified(data, digest):
                    return self._keep(key, data, now, forgets)
                return CachedBlob(store_key, body.size)  # read again as it is: not kept
            return CachedBlob(store_key, body.size, body)
        if self._local is None:
            stored = await self.store.stat(store_key)
            return CachedBlob(store_key, stored) if stored is not None else None
        try:
            opened = await asyncio.to_thread(open_local, self._local.local_path(store_key),
                                             digest)
        except FileNotFoundError:
            return None
        if isinstance(opened, bytes):
            return self._keep(key, opened, now, forgets)
        return OpenBlob(*opened)

    def _keep(self, key: BlobKey, data: bytes, when: float, forgets: int) -> MemoryBlob:
        """Keep a small blob read at `when`, unless one was forgotten since (an eviction
        that deleted it while it was read: the read has it, the memory must not)."""
        found = MemoryBlob(data)
        if forgets == self._forgets:
            self._small[key] = (found, when)
        return found

    def forget(self, namespace: str, digest: str) -> None:
        """An evicted (or vanished) blob: the bytes kept in memory go too."""
        self._forgets += 1
        self._small.pop((namespace, digest), None)

    async def cached_size(self, route: Route, digest: Digest) -> int | None:
        """The size of the committed blob, from the index if it knows (HEAD)."""
        key = (route.namespace, str(digest))
        size = await self.index.blob_size(key)
        if size is None:
            size = await self.store.stat(blob_key(route.namespace, digest))
            if size is not None:
                await self.index.set_blob(key, size)
        return size

    async def get(self, upstream: Upstream, route: Route, repository: str, digest: Digest,
                  *, admit: Callable[[], None] | None = None, byte_range: str | None = None
                  ) -> MemoryBlob | OpenBlob | CachedBlob | tuple[BlobFlight, bool] | Relay:
        """For a GET: the committed blob, or its in-flight fetch (True: started here), or
        while the disk is full a relay from the upstream. Counts the outcome once.
        `admit()` is called (and may raise) before this GET would start an upstream fetch;
        joining a fetch under way costs the upstream nothing and is not a miss.
        `byte_range`: the client's Range, for a store whose read is begun here."""
        key = (route.namespace, str(digest))
        if (small := self.small(route, digest)) is not None:
            self.hit(route, digest)
            return small
        found = await self._open(route, digest, key, byte_range)
        if found is None:
            self.forget(*key)  # kept in memory (past its recheck), gone from the store
        if found is None and await self.index.blob_size(key) is not None:
            # Committed while we looked (the index learns of a commit before its flight
            # ends), or deleted behind our back: a second look tells which.
            found = await self._open(route, digest, key, byte_range)
            if found is None:
                await self.index.forget_blob(key)
                await self.contents.forget(route.namespace, "blob", key[1])
        if found is not None:
            await self.served(route, digest, found.size)
            return found
        if admit is not None and self.inflight(route, digest) is None:
            admit()
        if self.disk.relaying() and self.inflight(route, digest) is None:
            self._count(route, "miss")  # a spool would fail again: relay, keep nothing
            return self.disk.relay(upstream, route.name, repository, digest)
        flight, started = self.fetch(upstream, route, repository, digest)
        if started and self._shared:  # a miss only if no other worker fetches it already
            await flight.claimed.wait()
            started = not flight.mirrored
            if isinstance(flight.error, StoredMeanwhile):
                found = await self._open(route, digest, (route.namespace, str(digest)),
                                         byte_range)
                if found is not None:
                    await self.served(route, digest, found.size)
                    return found
        self._count(route, "miss" if started else "coalesced")
        return flight, started

    def small(self, route: Route, digest: Digest) -> MemoryBlob | None:
        """A small blob held in memory, read within its recheck; nothing counted."""
        kept = self._small.get((route.namespace, str(digest)))
        return kept[0] if kept and 0 <= self._clock() - kept[1] < SMALL_RECHECK else None

    def hit(self, route: Route, digest: Digest) -> None:
        """A blob served: a hit, an access (the catalogue's: eviction goes by it). For
        `small`'s, the index hears at each recheck: once a second is all it needs."""
        self._count(route, "hit")
        self.contents.touch(route.namespace, "blob", str(digest))

    async def committed(self, route: Route, digest: Digest, byte_range: str | None = None
                        ) -> MemoryBlob | OpenBlob | CachedBlob | None:
        """The committed blob, opened as `get()` opens it; counted by nobody (for a reader
        of a flight that ended StoredMeanwhile: it was counted when it joined)."""
        return await self._open(route, digest, (route.namespace, str(digest)), byte_range)

    async def served(self, route: Route, digest: Digest, size: int) -> None:
        """A committed blob is being served (or redirected to): a hit, an access."""
        key = (route.namespace, str(digest))
        if size != await self.index.blob_size(key):
            await self.index.set_blob(key, size)
        else:
            await self.index.touch(key)
        self.hit(route, digest)

    async def known_size(self, route: Route, digest: Digest) -> int | None:
        """The committed blob's size if the index knows it (asks the store nothing)."""
        return await self.index.blob_size((route.namespace, str(digest)))

    def inflight(self, route: Route, digest: Digest) -> BlobFlight | None:
        return self.flights.get((route.namespace, str(digest)))

    def fetch(self, upstream: Upstream, route: Route, repository: str,
              digest: Digest) -> tuple[BlobFlight, bool]:
        """The in-flight fetch of a blob, started if needed; True if this call started it."""
        key = (route.namespace, str(digest))

        def start() -> tuple[BlobFlight, Coroutine[Any, Any, None]]:
            store_key = blob_key(route.namespace, digest)
            spool = self._scratch() / f"{digest.hex}.{secrets.token_hex(4)}"
            final = self._local.local_path(store_key) if self._local is not None else None
            flight = BlobFlight(digest, spool, final, orphan_limit=route.cache.orphan_fetch_limit,
                                disk=self.disk, route=route.name)
            return flight, self._run(flight, upstream, route, repository, store_key)

        return self.flights.join(key, start)

    async def _commit(self, store_key: str, spool: Path, size: int,
                      streamed: StreamedUpload | None) -> None:
        if streamed is not None:  # a remote store: uploaded while it streamed in
            await streamed.commit(size)
            return
        assert self._local is not None
        try:
            await self._local.adopt(store_key, spool)
        except FileNotFoundError:  # called again after a full disk: moved in already?
            if await self.store.stat(store_key) != size:
                raise

    def _plan(self, upstream: Upstream, route: Route, path: str, open_upstream: Opener,
              digest: Digest) -> Plan | None:
        """The route's parallel ranged fetch, if it has one (cache/ranged.py)."""
        threshold, parts = route.cache.parallel_fetch_threshold, route.cache.parallel_fetch_parts
        if threshold is None or parts < 2:
            return None
        m, opener = self.metrics, reuse_redirect(open_upstream, lambda url, headers: (
            upstream.get_redirected(url, headers, kind="blob")), path)

        def on_mode(mode: str) -> None:
            m.blob_transfers.labels(route.name, mode).inc()
            self.sizes.seen(route.name, mode)

        return Plan(max(threshold, 1), parts, opener, self.sizes.size(route, str(digest)),
                    on_mode=on_mode,
                    on_part=m.blob_parts.labels(route.name).inc,
                    on_part_resume=m.blob_part_resumes.labels(route.name).inc)

    async def _run(self, flight: BlobFlight, upstream: Upstream, route: Route,
                   repository: str, store_key: str) -> None:
        """Fetch the blob, or follow the process that fetches it (several workers)."""
        stored = False
        try:
            claim: Lead | Follow = await self.coordinator.claim(
                f"blob {route.namespace} {flight.digest}")
            # Another worker or replica fetches it, or stored it before our lead (known
            # before `claimed`: a GET told MISS cost the upstream): a coalesced GET here.
            flight.mirrored = isinstance(claim, Follow) or (
                isinstance(claim, Sourced) and not claim.leading)
            if not isinstance(claim, Follow) and not flight.mirrored and claim.shared:
                flight.mirrored = stored = await self._stored_meanwhile(flight, store_key)
        finally:
            flight.claimed.set()
        if stored:
            assert not isinstance(claim, Follow)
            await claim.release()
            return
        while isinstance(claim, Follow):
            taken = await follow(flight, claim)
            if taken is None:
                return  # followed to its end
            claim = taken  # its leader died before sending a byte here: fetch it now
        try:
            if claim.shared and await self._stored_meanwhile(flight, store_key):
                return
            flight.publish, flight.followed = claim.publish, claim.shared
            claim.publish(flight)  # at once: a record a dead leader left must not stand
            await self._fetch(flight, upstream, route, repository, store_key, claim)
        finally:
            await claim.release()

    async def _stored_meanwhile(self, flight: BlobFlight, store_key: str) -> bool:
        """Committed by another between our look and our lead: served from its file, or
        (no local files) failed StoredMeanwhile, so that its readers read the store."""
        size = await self.store.stat(store_key)
        if size is None:
            return False
        if flight.final_path is None:
            flight.fail(StoredMeanwhile(f"blob {flight.digest} is stored now"))
        else:
            flight.mirror(flight.final_path, size, size, True)
        return True

    def _drop_later(self, spool: Path) -> None:
        async def drop() -> None:
            await asyncio.sleep(SPOOL_GRACE)
            await asyncio.to_thread(spool.unlink, True)

        task = asyncio.get_running_loop().create_task(drop(), name=f"drop {spool.name}")
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)

    def _upstream_bytes(self, route: Route, remote: Sourced | None) -> Callable[[int], None]:
        """Counts the bytes that came from the upstream (not from another replica)."""
        count: Callable[[int], None] = self.metrics.upstream_bytes.labels(route.name).inc
        if remote is None:
            return count
        return lambda n: count(n) if remote.leading else None

    async def _fetch(self, flight: BlobFlight, upstream: Upstream, route: Route,
                     repository: str, store_key: str, claim: Lead) -> None:
        path = f"/v2/{repository}/blobs/{flight.digest}"
        # Another replica fetches it (redis:): its bytes, verified here too; the store
        # and the upstream are this replica's business only if it takes the lead over.
        remote = claim if isinstance(claim, Sourced) and not claim.leading else None
        reserved = 0

        async def open_upstream(headers: dict[str, str]) -> aiohttp.ClientResponse:
            nonlocal reserved
            resp = await upstream.request("GET", path, kind="blob", repository=repository,
                                          headers=headers)
            length = blob_length(resp)
            if not reserved and length:  # make room before the bytes arrive
                reserved = length
                self.space.reserve(reserved)
            return resp

        # A store without local files gets the blob while it streams in (s3_stream.py).
        streamed = None if self._local is not None else \
            StreamedUpload(flight, self.store.upload(store_key))

        async def commit(spool: Path) -> None:
            if remote is not None and not remote.leading and self._local is None:
                return  # the leading replica keeps it in the shared store
            await self._commit(store_key, spool, flight.written, streamed)
            await self.index.set_blob((route.namespace, str(flight.digest)), flight.written)
            await self.contents.add_blob(route.namespace, str(flight.digest), flight.written)

        gauge = self.metrics.inflight.labels(route.name)
        gauge.inc()
        if streamed is not None and remote is None:
            streamed.start()
        try:
            plan = self._plan(upstream, route, path, open_upstream, flight.digest) \
                if remote is None else None
            # Taking over: the upload begins, from the spool's first byte.
            source = remote.source(route.namespace, str(flight.digest), open_upstream,
                                   streamed.start if streamed else lambda: None
                                   ) if remote is not None else open_upstream
            # Held: a reload that replaced this route closes its client only after us (the
            # request that began the flight holds it until this task runs).
            with upstream.in_use():
                # With parts, every request (the first too) learns or reuses the redirect.
                await flight.run(plan.open_part if plan else source, commit,
                                 on_bytes=self._upstream_bytes(route, remote),
                                 on_resume=self.metrics.resumed.labels(route.name).inc,
                                 plan=plan, pace=upstream.pace)
            if isinstance(flight.error, IntegrityError):
                self.metrics.integrity_failures.labels(route.name, "blob").inc()
        finally:
            if streamed is not None:  # not committed (failed, abandoned): drop the parts
                await streamed.abort()
                if flight.done:  # no local file to reopen: late readers need the spool
                    self._drop_later(flight.spool)
                else:
                    await asyncio.to_thread(flight.spool.unlink, True)
            gauge.dec()
            self.space.release(reserved)
            self.space.wake()
