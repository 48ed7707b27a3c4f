"""Reading one blob's bytes from its upstream: from an offset to the end, in batches of about
1 MiB, resumed with Range when the connection breaks. Shared by the spooled flight and the
relay (disk full); what the bytes become is the caller's business.

Touches neither the disk nor a client, and never judges the bytes (callers hash them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Awaitable, Callable

import aiohttp

from ..errors import RegistryError, UpstreamError

CHUNK = 1 << 20  # disk and hash work is done off the loop in chunks of up to 1 MiB
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # preadv2's flag, Linux 4.14+
MAX_RESUMES = 3
GATHER_SECONDS = 0.02


class IntegrityError(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__("DIGEST_INVALID", message, 502)


class FetchAborted(Exception):
    """The transfer a reader was following failed; the reader must abort its client."""


Opener = Callable[[dict[str, str]], Awaitable[aiohttp.ClientResponse]]
Pace = Callable[[int], Awaitable[None]]  # returns once `count` more bytes may be read
_BROKEN = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


def _nothing(_count: int = 0) -> None:
    pass


class UpstreamBody:
    """The bytes of one blob from `start` to its end, as one stream however often the
    connection breaks. `open()` sends the first request; `chunks()` yields the bytes."""

    def __init__(self, open_upstream: Opener, start: int = 0, *, end: int | None = None,
                 on_bytes: Callable[[int], None] = _nothing,
                 on_resume: Callable[[], None] = _nothing,
                 pace: Pace | None = None) -> None:
        self._open = open_upstream
        self._pace = pace  # a route's upstream bandwidth cap: reads wait their turn
        self.position = start  # blob offset of the next byte chunks() yields
        # A part [start, end) of the blob (ranged.py), or None: up to the blob's end. An
        # answer that covers the whole blob (200, or a 206 up to its end) clears it.
        self.end = end
        self.size: int | None = None  # the blob's length, if the upstream said
        self.resumes = 0
        self._on_bytes = on_bytes
        self._on_resume = on_resume
        self._resp: aiohttp.ClientResponse | None = None
        self._skip = 0  # bytes of the current answer before `position` (a 200 to a Range)
        self._gather = False

    async def open(self) -> None:
        try:
            await self._request(ranged=self.position > 0 or self.end is not None)
        except UpstreamError as exc:
            if exc.status != 416 or self.position > 0 or self.end is None:
                raise
            self.end = None  # an empty blob has no byte 0 to ask for: ask for all of it
            await self._request(ranged=False)

    def close(self) -> None:
        if self._resp is not None:
            self._resp.release()

    async def _request(self, *, ranged: bool) -> None:
        last = "" if self.end is None else str(self.end - 1)
        headers = {"Range": f"bytes={self.position}-{last}"} if ranged else {}
        resp = await self._open(headers)
        self._resp, self._gather = resp, False  # the first bytes of an answer go out at once
        if ranged and resp.status == 206:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {self.position}-"):
                raise UpstreamError("UNAVAILABLE", "upstream answered a resume with the "
                                    "wrong range", 502, retryable=True)
            self._skip = 0
            length = _total(content_range)
            if self.end is not None:
                self._check_part(content_range, length)
        elif self.end is not None and self.position > 0:
            # A part must come as asked: the whole blob again would fetch bytes twice.
            raise UpstreamError("UNAVAILABLE", "upstream stopped honouring Range in the "
                                "middle of a ranged transfer", 502, retryable=True)
        else:
            self.end = None
            # Without Range, or an upstream that ignores it: the whole blob again.
            self._skip = self.position
            length = resp.content_length
        if self.size is None:
            self.size = length

    def _check_part(self, content_range: str, length: int | None) -> None:
        """A part's answer must end where asked, or at the blob's end: more would
        overlap the next part (one upstream copy of each byte)."""
        assert self.end is not None
        last = content_range[len("bytes "):].partition("/")[0].partition("-")[2]
        want = self.end if length is None else min(self.end, length)
        if not last.isdigit() or int(last) + 1 != want:
            raise UpstreamError("UNAVAILABLE", f"upstream answered Range bytes="
                                f"{self.position}-{self.end - 1} with {content_range!r}",
                                502, retryable=True)
        if length is not None and self.end >= length and self.position == 0:
            self.end = None  # the whole blob in one answer: resumes ask for the rest

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Every byte from `position` to the end (Docker Hub's CDN and containerd both
        honour Range). Raises UpstreamError once the transfer broke too often."""
        while True:
            try:
                data = await self._next()
            except _BROKEN as exc:
                await self._resume(exc)
                continue
            if not data:
                return
            yield data

    async def _next(self) -> bytes:
        """The next batch of bytes at `position`, b"" at the end of the answer."""
        assert self._resp is not None, "open() first"
        content = self._resp.content
        while True:
            data = await content.read(CHUNK)
            if not data:
                return b""
            if len(data) < CHUNK:
                data = await gather(content, data, GATHER_SECONDS if self._gather else 0.0)
            self._gather = True
            self._on_bytes(len(data))
            if self._pace is not None:
                # Not reading is what slows the upstream down (TCP's window closes);
                # aiohttp stops the read timeout while the buffer is full.
                await self._pace(len(data))
            if self._skip:
                cut = min(self._skip, len(data))
                data, self._skip = data[cut:], self._skip - cut
                if not data:
                    continue
            self.position += len(data)
            return data

    async def _resume(self, exc: BaseException) -> None:
        self.close()
        if self.resumes >= MAX_RESUMES or self.size is None:
            raise UpstreamError("UNAVAILABLE", f"blob transfer broke after {self.position} "
                                f"bytes ({type(exc).__name__})", 502, retryable=True) from None
        self.resumes += 1
        self._on_resume()
        await self._request(ranged=True)


def _total(content_range: str) -> int | None:
    total = content_range.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def blob_length(resp: aiohttp.ClientResponse) -> int | None:
    """The whole blob's length from an answer to a GET of it, ranged or not."""
    if resp.status == 206:
        return _total(resp.headers.get("Content-Range", ""))
    return resp.content_length


async def gather(content: aiohttp.StreamReader, first: bytes, seconds: float) -> bytes:
    """Add to `first` what arrives within `seconds`, up to CHUNK: the thread hop, the
    hash call and the readers' wake-up are then paid per ~1 MiB, not per ~64 KiB
    socket read (a 96 MB layer took 1,349 hops before)."""
    buf = bytearray(first)
    deadline = asyncio.get_running_loop().time() + seconds
    while len(buf) < CHUNK:
        more = content.read_nowait(CHUNK - len(buf))
        if more:
            buf += more
            continue
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0 or content.at_eof():
            break
        try:
            async with asyncio.timeout(remaining):
                more = await content.read(CHUNK - len(buf))
        except TimeoutError:
            break
        if not more:
            break
        buf += more
    return bytes(buf)


async def read_span(fd: int, offset: int, count: int) -> AsyncGenerator[bytes, None]:
    while count > 0:
        data = await asyncio.to_thread(os.pread, fd, min(CHUNK, count), offset)
        if not data:
            raise FetchAborted("spool file shrank")
        offset += len(data)
        count -= len(data)
        yield data


def _read_cached(fd: int, size: int, offset: int) -> bytearray | None:
    """Up to `size` bytes at `offset` if the page cache holds them, None if reading would
    wait for the disk: RWF_NOWAIT never blocks, so this may run on the loop."""
    if _NOWAIT is None:
        return None
    buf = bytearray(size)
    try:
        got = os.preadv(fd, [buf], offset, _NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: a filesystem that cannot say
        return None
    del buf[got:]
    return buf


async def read_span_cached(fd: int, offset: int, count: int,
                           chunk: int) -> AsyncGenerator[bytes | bytearray, None]:
    """As read_span, in smaller chunks: what the page cache holds is read on the loop (a
    copy, no thread hop, which for a small chunk costs more than the copy), the rest in
    a thread. For senders that must hold little per connection (TLS)."""
    unhopped = 0  # bytes read on the loop since it last ran something else
    while count > 0:
        size = min(chunk, count)
        data: bytes | bytearray | None = _read_cached(fd, size, offset)
        if data is None:
            data = await asyncio.to_thread(os.pread, fd, size, offset)
            unhopped = 0
        elif (unhopped := unhopped + len(data)) >= CHUNK:
            await asyncio.sleep(0)  # no hop for a while: let the loop run others too
            unhopped = 0
        if not data:
            raise FetchAborted("spool file shrank")
        offset += len(data)
        count -= len(data)
        yield data
