"""Parallel ranged fetch: one cold blob as several Range parts at once, written into its
spool at their offsets, hashed in order as the contiguous prefix grows.

Owns the part schedule (a sliding window over fixed-size parts, lowest offset first, so
the prefix completes first) and the reuse of a CDN redirect. Never serves a byte and never
judges the blob (the flight verifies it); each byte is asked of the upstream once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from cachetools import LRUCache
from yarl import URL

from ..config import Route
from ..errors import UpstreamError
from .transfer import CHUNK, Opener, Pace, UpstreamBody

T = TypeVar("T")
# A signed CDN URL is asked again after this long even if it still works: its expiry
# is the CDN's business (Docker Hub's last ~20 minutes), and a new one costs one request.
REDIRECT_REUSE_SECONDS = 300.0
MAX_PART = 64 << 20  # a part's most: a huge blob still comes as a sliding window of parts
CATCH_UP_STEP = 8 << 20  # bytes hashed (read back) between two notes of progress
MIN_PART = 1 << 20  # a part's least, when the parts are laid out by a declared size
Write = Callable[[int, "hashlib._Hash | None", bytes, int], None]  # (fd, hasher, data, at)
WithRoom = Callable[[Callable[[], Awaitable[None]], int, Callable[[], str]], Awaitable[None]]
GetRedirected = Callable[[URL, dict[str, str]], Awaitable[aiohttp.ClientResponse | None]]


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Plan:
    """How one route fetches a cold blob in parts: the first answer's `part_size` bytes
    (also the threshold: a blob no larger comes in one answer), then the rest (`layout`),
    `parts` at once."""

    part_size: int
    parts: int
    open_part: Opener  # every request of the transfer (reuse_redirect)
    # The size the blob's manifest declared, if one fetched here did: its parts are laid
    # out before the first answer, and all of them start at once (`open_first`).
    size: int | None = None
    on_mode: Callable[[str], None] = lambda _mode: None  # "ranged" | "single"
    on_part: Callable[[], None] = _nothing
    on_part_resume: Callable[[], None] = _nothing

    @property
    def declared(self) -> bool:
        return self.size is not None and self.size > self.part_size

    @property
    def first_end(self) -> int:
        """Where the first request's Range ends."""
        return layout(self, self.size)[0][1] if self.declared and self.size else self.part_size

    def applies(self, first: UpstreamBody) -> bool:
        """Whether the first answer allows parts: a 206 that named the blob's size and
        left some of it for other parts (an upstream that ignores Range answered 200)."""
        return first.end is not None and first.size is not None and first.size > first.end


class DeclaredSizes:
    """The blob sizes that the manifests fetched upstream declare (bounded), by which a
    cold blob's parts are laid out and all asked for at once; and the routes whose
    upstream answered a ranged fetch. Only those use the sizes: an upstream that ignores
    Range would send each early part the whole blob."""

    def __init__(self, entries: int = 16384) -> None:
        self._sizes: LRUCache[tuple[str, str], int] = LRUCache(maxsize=entries)
        self._ranged: set[str] = set()

    def declare(self, namespace: str, sizes: list[tuple[str, int]]) -> None:
        self._sizes.update(((namespace, digest), size) for digest, size in sizes)

    def size(self, route: Route, digest: str) -> int | None:
        if route.name not in self._ranged:
            return None
        return self._sizes.get((route.namespace, digest))

    def seen(self, route: str, mode: str) -> None:
        """A transfer on `route` went `mode` ("ranged": its upstream honours Range)."""
        if mode == "ranged":
            self._ranged.add(route)


def reuse_redirect(open_upstream: Opener, get_redirected: GetRedirected, path: str, *,
                   clock: Callable[[], float] = time.monotonic) -> Opener:
    """An opener that asks the registry once and then GETs the URL it redirected to (a
    CDN's signed URL) directly while that works: a part costs one round trip to the CDN,
    not one to the registry and one to the CDN. Asks the registry again when the URL is
    refused (expired) or older than REDIRECT_REUSE_SECONDS."""
    seen: tuple[URL, float] | None = None

    async def open_part(headers: dict[str, str]) -> aiohttp.ClientResponse:
        nonlocal seen
        if seen is not None and clock() - seen[1] < REDIRECT_REUSE_SECONDS:
            resp = await get_redirected(seen[0], headers)
            if resp is not None:
                return resp
        resp = await open_upstream(headers)
        seen = (resp.url, clock()) if resp.url.path != path else None
        return resp

    return open_part


def layout(plan: Plan, size: int) -> list[tuple[int, int]]:
    """The parts of a `size`-byte blob. Its size declared and right: equal parts, one per
    connection (none under MIN_PART nor over MAX_PART). Otherwise the first answer's
    bytes (`first_end`), then the rest in equal parts, one per other connection, none
    smaller than `part_size` nor larger than MAX_PART. Equal parts end together: a layer
    a little above the threshold does not finish on one connection, and a big one costs
    few requests (each is a round trip to the upstream)."""
    if plan.size == size and plan.declared:
        step = max(MIN_PART, min(-(-size // plan.parts), MAX_PART))
        return [(s, min(s + step, size)) for s in range(0, size, step)]
    first = min(plan.first_end, size)
    rest = size - first
    step = max(plan.part_size, min(-(-rest // max(plan.parts - 1, 1)), MAX_PART))
    return [(0, first)] + [(s, min(s + step, size)) for s in range(first, size, step)]


@dataclass
class _Part:
    start: int
    end: int
    position: int  # the next byte of this part to write


class _Orphaned(Exception):
    """Nobody waits for the blob any more and too much of it is left."""


class Parts:
    """The parts of one blob after the first answer: `run(first)` fetches them all (the
    first over `first`, already open), writes each at its offset and hashes the prefix.

    `write(fd, hasher, data, offset)` writes (and hashes, given a hasher) in a thread;
    `progress(prefix)` says how many bytes from the start are written and hashed;
    `orphaned()` says whether to give up; `with_room(op, needed, doing)` runs a disk
    write with the flight's disk-full handling.
    """

    def __init__(self, plan: Plan, *, fd: int, hasher: hashlib._Hash, size: int,
                 write: Write, with_room: WithRoom, progress: Callable[[int], None],
                 orphaned: Callable[[], bool], on_bytes: Callable[[int], None],
                 on_resume: Callable[[], None], what: str, pace: Pace | None = None) -> None:
        self._plan = plan
        self._pace = pace  # the route's upstream bandwidth cap, shared with every part
        self._fd = fd
        self._hasher = hasher
        self._size = size
        self._write_at = write  # blocking: pwrite whole, then hash if given a hasher
        self._with_room = with_room
        self._progress = progress
        self._orphaned = orphaned
        self._on_bytes = on_bytes
        self._on_resume = on_resume
        self._what = what  # "blob sha256:..." for messages
        self._parts = [_Part(s, e, s) for s, e in layout(plan, size)]
        self._next = 1  # the first part is the first answer's
        self._whole = 0  # parts [0, _whole) are written whole
        self._early: list[asyncio.Task[None]] = []  # workers started before the first answer
        self.hashed = 0  # bytes [0, hashed) are written and hashed
        self._lock = asyncio.Lock()  # one hash operation at a time: the hash in order

    def start_others(self) -> None:
        """Start the workers of the other parts now, before the first answer is back (the
        size is declared): `run` adopts them, `cancel` stops them."""
        self._early = self._others()

    def _others(self) -> list[asyncio.Task[None]]:
        """The workers besides the first answer's: one per other connection."""
        return [asyncio.create_task(self._worker(None))
                for _ in range(min(self._plan.parts, len(self._parts)) - 1)]

    async def cancel(self) -> None:
        for task in self._early:
            task.cancel()
        await asyncio.gather(*self._early, return_exceptions=True)
        self._early = []

    async def run(self, first: UpstreamBody) -> None:
        workers = [asyncio.create_task(self._worker(first))]
        workers += self._early or self._others()
        self._early = []
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in workers:  # the first failure in part order is the transfer's
                if task.done() and not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    if isinstance(exc, _Orphaned):
                        raise asyncio.CancelledError(str(exc))
                    assert exc is not None
                    raise exc
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if self.hashed != self._size:  # every part ended where asked: a bug if not
            raise UpstreamError("UNAVAILABLE", f"{self._what}: parts left a gap at byte "
                                f"{self.hashed}", 502, retryable=True)

    def _take(self) -> _Part | None:
        if self._next >= len(self._parts):
            return None
        part = self._parts[self._next]
        self._next += 1
        return part

    async def _worker(self, body: UpstreamBody | None) -> None:
        part = self._parts[0] if body is not None else self._take()
        while part is not None:
            if body is None:
                body = UpstreamBody(self._plan.open_part, part.start, end=part.end,
                                    on_bytes=self._on_bytes, on_resume=self._resumed,
                                    pace=self._pace)
                try:
                    await body.open()
                    await self._fetch(part, body)
                finally:
                    body.close()
            else:
                await self._fetch(part, body)  # the first answer: its owner closes it
            self._plan.on_part()
            body, part = None, self._take()

    def _resumed(self) -> None:
        self._on_resume()
        self._plan.on_part_resume()

    async def _fetch(self, part: _Part, body: UpstreamBody) -> None:
        if body.size != self._size:
            raise UpstreamError("UNAVAILABLE", f"{self._what}: the upstream said "
                                f"{body.size} bytes for a part, {self._size} before", 502,
                                retryable=True)
        async for data in body.chunks():
            if part.position + len(data) > part.end:
                raise UpstreamError("UNAVAILABLE", f"{self._what}: the upstream sent more "
                                    "than the part asked for", 502, retryable=True)
            await self._write(part, data)
            if self._orphaned():
                raise _Orphaned("nobody waits and too much is left")
        if part.position != part.end:
            raise UpstreamError("UNAVAILABLE", f"{self._what}: a part ended at byte "
                                f"{part.position}, want {part.end}", 502, retryable=True)

    async def _write(self, part: _Part, data: bytes) -> None:
        offset = part.position

        def doing() -> str:
            return f"spooling {self._what} at byte {offset}"

        if offset == self.hashed:  # the prefix's own bytes: hashed on the way, in order
            async with self._lock:  # (the hash cannot pass `offset` while it waits)
                await self._with_room(lambda: asyncio.to_thread(
                    self._write_at, self._fd, self._hasher, data, offset),
                    self._size - offset, doing)
                self.hashed += len(data)
        else:
            # Past the prefix: written while the hash goes on, which reads only bytes
            # of whole or counted writes before this part's position, never these.
            await self._with_room(lambda: asyncio.to_thread(
                self._write_at, self._fd, None, data, offset), self._size - self.hashed, doing)
        part.position += len(data)
        await self._catch_up()
        self._progress(self.hashed)

    async def _catch_up(self) -> None:
        """Hash what later parts wrote once the prefix reaches it (read back: it is in
        the page cache), so the hash stays in order. Other parts keep writing meanwhile:
        a catch-up over parts that ended together would otherwise stall every
        connection for as long as it hashes (~0.1 s per 100 MiB)."""
        async with self._lock:
            end = self._contiguous()
            while end > self.hashed:  # in steps: readers get each one as it is hashed
                step = min(end, self.hashed + CATCH_UP_STEP)
                await asyncio.to_thread(hash_span, self._fd, self._hasher, self.hashed, step)
                self.hashed = step
                self._progress(step)

    def _contiguous(self) -> int:
        index = self._whole  # the parts before it are written whole
        while index < len(self._parts) and self._parts[index].position == \
                self._parts[index].end:
            index += 1
        self._whole = index
        return self._parts[index].position if index < len(self._parts) else self._size


async def open_first(plan: Plan | None, first: UpstreamBody,
                     parts_of: Callable[[int], Parts]) -> Parts | None:
    """Open the transfer's first answer; the Parts that fetch the rest (`parts_of(size)`),
    or None for one stream. With a declared size the other parts are asked for at once
    rather than a round trip later; if the first answer says another size (or that the
    upstream ignores Range) they are stopped, and the answer decides."""
    early = parts_of(plan.size) if plan is not None and plan.declared and plan.size else None
    if early is not None:
        early.start_others()
    try:
        await first.open()
    except BaseException:
        if early is not None:
            await early.cancel()
        raise
    if early is not None:
        assert plan is not None
        if plan.applies(first) and first.size == plan.size:
            return early
        await early.cancel()
    if plan is None or not plan.applies(first):
        return None
    assert first.size is not None
    return parts_of(first.size)


def hash_span(fd: int, hasher: hashlib._Hash, start: int, end: int) -> None:
    """Hash bytes [start, end) of the file (blocking: runs in a thread)."""
    while start < end:
        data = os.pread(fd, min(CHUNK, end - start), start)
        if not data:
            raise OSError(f"the spool is shorter than {end} bytes")
        hasher.update(data)
        start += len(data)
