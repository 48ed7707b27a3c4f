"""One upstream blob transfer, spooled to disk while hashed, followed live by readers.

The pump writes to the spool file, never to client sockets; each reader follows the
growing file at its own pace, so a slow client slows only itself. The last byte is
released only after the digest and length are verified, so a corrupt transfer never
reaches a client as a complete, successful body. If the disk fills up, nothing partial is
kept and each reader goes on from the upstream (relay.py), verified the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import UpstreamError
from ..reference import Digest
from ..tasks import finish
from .diskfull import DiskFull, NoSpace, is_no_space
from .ranged import Parts, Plan, open_first
from .relay import Relay
from .transfer import CHUNK, FetchAborted, IntegrityError, Opener, Pace, UpstreamBody, read_span

__all__ = ["BlobFlight", "FetchAborted", "IntegrityError", "Opener", "read_span"]

Stretch = tuple[int, int, int]  # (fd, offset, count) of bytes on disk
T = TypeVar("T")


class BlobFlight:
    """A single in-flight fetch of one blob. Readers call `stream()`."""

    def __init__(self, digest: Digest, spool: Path, final_path: Path | None, *,
                 orphan_limit: int, disk: DiskFull, route: str) -> None:
        self.digest = digest
        self.spool = spool
        self.final_path = final_path  # where the bytes live once committed
        self.size: int | None = None
        self.written = 0
        self.done = False  # every byte is on disk and verified
        self.error: BaseException | None = None
        self.lost: NoSpace | None = None  # the disk was full: not kept (maybe served whole)
        self.readers = 0
        self.resumes = 0
        self._orphan_limit = orphan_limit
        self._disk = disk
        self._route = route
        self._open_upstream: Opener | None = None
        self._pace: Pace | None = None
        self._headers: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        # Across processes (cache/coordinate.py): told of every step; True while readers
        # in other processes may follow (the orphan limit then never drops the fetch).
        self.publish: Callable[[BlobFlight], None] | None = None
        self.followed = False
        self.mirrored = False  # another process fetches it: this one follows
        self.claimed = asyncio.Event()  # set once it is known which

    @property
    def headers_known(self) -> bool:
        h = self._headers
        return h.done() and not h.cancelled() and h.exception() is None

    # ------------------------------------------------------------ the pump

    def _notify(self) -> None:
        if self.publish is not None:
            self.publish(self)
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def mirror(self, spool: Path, size: int | None, written: int, done: bool) -> None:
        """The progress of a transfer another process runs into `spool` (cache/follow.py):
        readers here follow it as if the bytes came from this process."""
        self.spool, self.size, self.written, self.done = spool, size, written, done
        if not self._headers.done():
            self._headers.set_result(None)
        self._notify()

    def fail(self, exc: BaseException) -> None:
        """A mirrored transfer ended without the blob: its readers give up."""
        self.error = exc
        if not self._headers.done():
            self._headers.set_exception(exc)
            self._headers.exception()  # retrieved: readers may all be gone
        self._notify()

    async def run(self, open_upstream: Opener, commit: Callable[[Path], Awaitable[None]],
                  on_bytes: Callable[[int], None], on_resume: Callable[[], None], *,
                  plan: Plan | None = None, pace: Pace | None = None) -> None:
        """Fetch, verify, commit. Never raises; the outcome is in `done`/`error`/`lost`.
        With a `plan`, a blob larger than its part size comes in parallel parts; `pace`
        (a route's upstream bandwidth cap) is awaited for every batch read."""
        self._open_upstream, self._pace = open_upstream, pace
        fd = -1
        try:
            # Read and write: a part written ahead of the prefix is hashed by reading it back.
            fd = await self._with_room(
                lambda: asyncio.to_thread(os.open, self.spool,
                                          os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644),
                CHUNK, lambda: f"creating the spool file of blob {self.digest}")
            hasher = hashlib.new(self.digest.algorithm)
            await self._transfer(open_upstream, fd, hasher, on_bytes, on_resume, plan, pace)
            self._verify(hasher)
            # Verified: readers may have their last byte now; making it durable (fsync,
            # then rename) need not hold them up (~0.2 s for a 100 MB layer).
            self.size = self.written
            self.done = True
            self._notify()
            # A stop lets that end: the blob is whole, and a clean stop rescans nothing, so
            # the catalogue must learn of every file the store gets.
            await finish(self._keep(fd, commit))
        except BaseException as exc:  # including CancelledError: readers must be released
            if isinstance(exc, NoSpace):
                self.lost = exc
            if not self.done:
                self.error = exc  # a failure after verification only loses the cache copy
            if not self._headers.done():
                self._headers.set_exception(exc)
                self._headers.exception()  # mark retrieved: readers may all be gone
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.spool.unlink, True)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if fd >= 0:
                os.close(fd)
            self._notify()

    async def _keep(self, fd: int, commit: Callable[[Path], Awaitable[None]]) -> None:
        await self._make_durable(fd)
        await self._with_room(lambda: commit(self.spool), CHUNK,
                              lambda: f"moving blob {self.digest} into the store")

    async def _with_room(self, op: Callable[[], Awaitable[T]], needed: int,
                         doing: Callable[[], str],
                         again: Callable[[], Awaitable[T]] | None = None) -> T:
        """`op()`; if it fails for want of space, once more (by `again()` if given) after
        the evictor made room; NoSpace if there is none (counted and logged once)."""
        try:
            return await op()
        except OSError as exc:
            if not is_no_space(exc):
                raise
            first = exc
        if self.done:
            giving_up = "the blob was served whole but is not kept"
        else:
            giving_up = "not kept; its readers get the rest from the upstream"
        return await self._disk.recover(
            first, again or op, needed=needed, route=self._route, doing=doing(),
            giving_up=f"{giving_up}; new GETs of uncached blobs are relayed from the "
                      f"upstream for {self._disk.relay_seconds:g} s")

    async def _transfer(self, open_upstream: Opener, fd: int, hasher: hashlib._Hash,
                        on_bytes: Callable[[int], None], on_resume: Callable[[], None],
                        plan: Plan | None, pace: Pace | None) -> None:
        """Every byte of the blob into the spool, resuming a broken transfer with Range;
        in parallel parts if the plan applies (the first answer is then the first part)."""
        def resumed() -> None:
            self.resumes += 1
            on_resume()

        body = UpstreamBody(open_upstream, end=plan.first_end if plan else None,
                            on_bytes=on_bytes, on_resume=resumed, pace=pace)

        def parts_of(size: int) -> Parts:
            assert plan is not None
            return Parts(plan, fd=fd, hasher=hasher, size=size, write=_write_and_hash,
                         with_room=self._with_room, progress=self._advanced,
                         orphaned=self._orphaned, on_bytes=on_bytes, on_resume=resumed,
                         what=f"blob {self.digest}", pace=pace)
        try:
            parts = await open_first(plan, body, parts_of)
            self.size = body.size
            if not self._headers.done():
                self._headers.set_result(None)
            if parts is not None:
                assert plan is not None
                plan.on_mode("ranged")
                await parts.run(body)
                return
            if plan is not None:
                plan.on_mode("single")
            await self._stream(body, fd, hasher)
            if body.end is not None:  # a 206 that did not say the blob's size: the rest
                body.close()
                body = UpstreamBody(open_upstream, self.written, on_bytes=on_bytes,
                                    on_resume=resumed)
                try:
                    await body.open()
                except UpstreamError as exc:
                    if exc.status != 416:  # 416: the first part was the whole blob
                        raise
                    return
                await self._stream(body, fd, hasher)
        finally:
            body.close()

    async def _stream(self, body: UpstreamBody, fd: int, hasher: hashlib._Hash) -> None:
        async with contextlib.aclosing(body.chunks()) as chunks:
            async for data in chunks:
                await self._write(fd, hasher, data)
                self._advanced(self.written + len(data))
                if self._orphaned():
                    raise asyncio.CancelledError("nobody waits and too much is left")

    def _advanced(self, prefix: int) -> None:
        """Bytes [0, prefix) are in the spool and hashed: readers may have them."""
        self.written = prefix
        self._notify()

    def _orphaned(self) -> bool:
        return self.readers == 0 and not self.followed and self.size is not None and \
            self.size - self.written > self._orphan_limit

    async def _write(self, fd: int, hasher: hashlib._Hash, data: bytes) -> None:
        offset = self.written
        # A retry writes the same bytes at the same offset again (pwrite), over whatever
        # part of them the failed write left.
        await self._with_room(
            lambda: asyncio.to_thread(_write_and_hash, fd, hasher, data, offset),
            (self.size - offset) if self.size is not None else len(data),
            lambda: f"spooling blob {self.digest} (at byte {offset} of {self.size or '?'})")

    async def _make_durable(self, fd: int) -> None:
        # Linux may mark the pages of a failed writeback clean, so a second fsync of the
        # same file can succeed without the bytes on disk (PostgreSQL's "fsyncgate"): the
        # retry writes a new copy, re-hashed as it is read back, and makes that durable.
        async def copy() -> None:
            old, self.spool = self.spool, await asyncio.to_thread(self._copy_spool)
            await asyncio.to_thread(old.unlink, True)

        await self._with_room(lambda: asyncio.to_thread(os.fsync, fd), self.written,
                              lambda: f"making blob {self.digest} durable (fsync)", again=copy)

    def _copy_spool(self) -> Path:
        """A durable copy of the verified spool next to it (blocking: runs in a thread)."""
        copy = self.spool.with_name(self.spool.name + ".copy")
        source = os.open(self.spool, os.O_RDONLY)
        target = -1
        try:
            target = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            hasher = hashlib.new(self.digest.algorithm)
            offset = 0
            while offset < self.written:
                data = os.pread(source, min(CHUNK, self.written - offset), offset)
                if not data:
                    raise IntegrityError(f"blob {self.digest}: the spool file shrank")
                _write_and_hash(target, hasher, data, offset)
                offset += len(data)
            if hasher.hexdigest() != self.digest.hex:
                raise IntegrityError(f"blob {self.digest}: the spool no longer holds the "
                                     "verified bytes")
            os.fsync(target)
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        finally:
            os.close(source)
            if target >= 0:
                os.close(target)
        return copy

    def _verify(self, hasher: hashlib._Hash) -> None:
        if self.size is not None and self.written != self.size:
            raise IntegrityError(f"blob {self.digest}: got {self.written} bytes, "
                                 f"want {self.size}")
        if hasher.hexdigest() != self.digest.hex:
            raise IntegrityError(f"blob {self.digest}: the upstream sent bytes with "
                                 f"another digest ({self.digest.algorithm}:"
                                 f"{hasher.hexdigest()[:12]}...)")

    # ----------------------------------------------------------- readers

    async def finished(self) -> bool:
        """Wait for the end of the transfer: True if every byte arrived verified."""
        while True:
            progress = self._progress
            if self.done or self.error is not None:
                return self.done
            await progress.wait()

    async def progressed(self) -> None:
        """Wait for the next change of `written`, `done` or `error` (for a follower that
        is not a client, e.g. a remote store's upload: it does not count as a reader)."""
        progress = self._progress
        if not self.done and self.error is None:
            await progress.wait()

    async def wait_headers(self) -> None:
        """Wait until the upstream answered (size known) or raise its error."""
        await asyncio.shield(self._headers)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Count a client as waiting on this fetch from its first moment (`stream()` counts
        only from its first read), so the orphan limit never drops a fetch somebody is
        about to read."""
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1

    async def spans(self, start: int = 0, end: int | None = None
                    ) -> AsyncGenerator[Stretch | bytes, None]:
        """Yield (fd, offset, count): the next stretch of [start, end) that is on disk.

        The consumer sends each stretch whole before asking for the next (by sendfile or
        by reads). If the disk filled up under this fetch, the rest comes as bytes relayed
        from the upstream instead. Raises FetchAborted if the fetch (or relay) fails.
        """
        self.readers += 1
        fd = -1
        try:
            with contextlib.suppress(NoSpace):  # no spool at all: all of it is relayed
                await self.wait_headers()
                try:
                    fd = await asyncio.to_thread(self._open_for_reading)
                except FetchAborted:
                    if self.lost is None:
                        raise
            pos = start
            while end is None or pos < end:
                if self.lost is not None and (fd < 0 or not self.done):
                    relay, fd = self.relay(fd), -1  # the relay closes the spool's fd
                    try:
                        async with contextlib.aclosing(relay.stream(pos, end)) as rest:
                            async for data in rest:
                                yield data
                    finally:
                        relay.close()
                    return
                if self.error is not None:
                    raise FetchAborted(str(self.error))
                # Hold back the last byte until the whole blob is verified.
                available = self.written if self.done else self.written - 1
                if pos >= available:
                    if self.done:
                        return
                    progress = self._progress
                    await progress.wait()
                    continue
                count = (available if end is None else min(available, end)) - pos
                yield fd, pos, count
                pos += count
        finally:
            self.readers -= 1
            if fd >= 0:
                os.close(fd)

    def relay(self, fd: int = -1) -> Relay:
        """This blob from the upstream for a reader the disk left without a spool to
        follow: the bytes spooled so far through `fd` (the reader's descriptor of the
        unlinked spool, if it has one; the relay closes it), the rest by a ranged GET;
        all of it hashed."""
        assert self._open_upstream is not None, "run() first"
        return self._disk.relay_for(self._route, self.digest, self._open_upstream,
                                    size=self.size, prefix_fd=fd,
                                    prefix_len=self.written if fd >= 0 else 0,
                                    pace=self._pace)

    async def stream(self, start: int = 0, end: int | None = None) -> AsyncGenerator[bytes, None]:
        """Yield bytes [start, end) as they arrive, in reads of up to 1 MiB."""
        async with contextlib.aclosing(self.spans(start, end)) as spans:
            async for stretch in spans:
                if isinstance(stretch, bytes):
                    yield stretch
                    continue
                async with contextlib.aclosing(read_span(*stretch)) as chunks:
                    async for data in chunks:
                        yield data

    def _open_for_reading(self) -> int:
        try:
            return os.open(self.spool, os.O_RDONLY)
        except FileNotFoundError:
            if self.final_path is None or self.error is not None:
                raise FetchAborted("the fetch failed") from None
        try:
            return os.open(self.final_path, os.O_RDONLY)
        except OSError as exc:  # renamed and then lost (disk trouble): nothing to follow
            raise FetchAborted(f"the fetched blob is gone ({exc.strerror})") from None


def _write_and_hash(fd: int, hasher: hashlib._Hash | None, data: bytes, offset: int) -> None:
    """Write `data` at `offset` whole, then hash it (if a hasher is given): a failed write
    leaves the hash as it was, so the write can be retried."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    if hasher is not None:
        hasher.update(data)
