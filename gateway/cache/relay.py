"""A blob relayed to one client straight from its upstream, verified, kept nowhere: what a
GET gets while the disk is full, and how a reader goes on when the disk fills up under the
flight it was following.

Writes nothing to disk. Like the flight, it never lets a corrupt blob end cleanly: the last
byte is released only once the whole blob hashed to its digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator, Callable

from ..errors import RegistryError
from ..reference import Digest
from .transfer import FetchAborted, IntegrityError, Opener, Pace, UpstreamBody, read_span


class Relay:
    """One client's copy of one blob.

    The first `prefix_len` bytes are read from `prefix_fd` (the spool of a flight that ran
    out of space: still readable through an open descriptor after it was unlinked), the
    rest from one upstream GET, ranged from `prefix_len`. Every byte of the blob is
    hashed, also the ones outside the range a client asked for. The relay owns
    `prefix_fd` and closes it once the prefix is read: the unlinked spool's blocks are
    freed then, not when the (slower) rest has arrived.
    """

    def __init__(self, digest: Digest, open_upstream: Opener, *, size: int | None = None,
                 prefix_fd: int = -1, prefix_len: int = 0,
                 on_bytes: Callable[[int], None], on_integrity_failure: Callable[[], None],
                 pace: Pace | None = None) -> None:
        self.digest = digest
        self.size = size
        self._prefix = (prefix_fd, prefix_len if prefix_fd >= 0 else 0)
        self._body = UpstreamBody(open_upstream, self._prefix[1], on_bytes=on_bytes, pace=pace)
        self._opened = False
        self._on_integrity_failure = on_integrity_failure

    async def open(self) -> None:
        """Send the upstream request; its error is the client's answer. Then `size` is the
        blob's length, if known."""
        self._opened = True
        await self._body.open()
        if self.size is None:
            self.size = self._body.size
        elif self._body.size not in (None, self.size):
            raise self._mismatch(f"the upstream now says {self._body.size} bytes, before "
                                 f"{self.size}")

    def close(self) -> None:
        self._close_prefix()
        self._body.close()

    def _close_prefix(self) -> None:
        fd, self._prefix = self._prefix[0], (-1, self._prefix[1])
        if fd >= 0:
            os.close(fd)

    async def stream(self, start: int = 0, end: int | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Bytes [start, end) of the blob (to its end if `end` is None). Any failure, a
        wrong digest included, raises FetchAborted before the last byte."""
        try:
            if not self._opened:
                await self.open()
            async with contextlib.aclosing(self._verified(start, end)) as pieces:
                async for piece in pieces:
                    yield piece
        except RegistryError as exc:  # the client has its headers: all we can do is abort
            raise FetchAborted(str(exc)) from None
        finally:
            self.close()

    async def _verified(self, start: int, end: int | None) -> AsyncGenerator[bytes, None]:
        hasher = hashlib.new(self.digest.algorithm)
        held = b""  # the last byte sent so far: released only once the digest matched
        offset = 0
        async with contextlib.aclosing(self._sources()) as sources:
            async for data in sources:
                await asyncio.to_thread(hasher.update, data)
                low = max(start - offset, 0)
                high = len(data) if end is None else min(end - offset, len(data))
                offset += len(data)
                if self.size is not None and offset > self.size:
                    raise self._mismatch(f"the upstream sent more than {self.size} bytes")
                if low < high:
                    if held:
                        yield held
                    if high - low > 1:
                        yield data[low:high - 1]
                    held = data[high - 1:high]
        if self.size is not None and offset != self.size:
            raise self._mismatch(f"got {offset} bytes, want {self.size}")
        if hasher.hexdigest() != self.digest.hex:
            raise self._mismatch(f"the upstream sent bytes with another digest "
                                 f"({self.digest.algorithm}:{hasher.hexdigest()[:12]}...)")
        if held:
            yield held

    def _mismatch(self, what: str) -> IntegrityError:
        self._on_integrity_failure()
        return IntegrityError(f"blob {self.digest} (relayed): {what}")

    async def _sources(self) -> AsyncGenerator[bytes, None]:
        fd, length = self._prefix
        if length:
            async with contextlib.aclosing(read_span(fd, 0, length)) as prefix:
                async for data in prefix:
                    yield data
        self._close_prefix()
        async with contextlib.aclosing(self._body.chunks()) as rest:
            async for data in rest:
                yield data
