"""A blob uploaded to a remote store (S3) while it streams in: a follower of the flight's
spool that feeds the store's `Upload` (fixed-size multipart parts) as the verified prefix
grows, so the object is complete in the store moments after the last byte arrived.

It is not a client: it never counts as a reader (an orphaned fetch is still dropped). It
never commits by itself: `commit()` is called only after the flight verified the digest;
anything else ends in `abort()`, which leaves nothing under the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from .flight import BlobFlight
from .store import Upload
from .transfer import CHUNK, FetchAborted

log = logging.getLogger("gateway.cache.s3")


class StreamedUpload:
    def __init__(self, flight: BlobFlight, upload: Upload) -> None:
        self._flight = flight
        self._upload = upload
        self._sent = 0
        self._committed = False
        self._task: asyncio.Task[None] | None = None  # owned: awaited or cancelled below

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"upload {self._flight.digest}")

    async def _follow(self) -> None:
        flight = self._flight
        await flight.wait_headers()
        fd = await asyncio.to_thread(os.open, flight.spool, os.O_RDONLY)
        try:
            while True:
                if flight.error is not None or flight.lost is not None:
                    raise FetchAborted("the fetch failed")
                if self._sent < flight.written:  # the hashed prefix: safe to send ahead
                    want = min(CHUNK * 4, flight.written - self._sent)
                    data = await asyncio.to_thread(os.pread, fd, want, self._sent)
                    if not data:
                        raise FetchAborted("the spool file shrank")
                    await self._upload.write(data)
                    self._sent += len(data)
                elif flight.done:
                    return
                else:
                    await flight.progressed()
        finally:
            os.close(fd)

    async def commit(self, size: int) -> None:
        """The flight verified `size` bytes: send what is left, then make the object
        visible under its key."""
        assert self._task is not None, "start() first"
        try:
            await self._task
            if self._sent != size:
                raise FetchAborted(f"uploaded {self._sent} of {size} bytes")
            await self._upload.commit()
        except Exception as exc:
            # The clients had every verified byte; only the store's copy is lost.
            log.warning("storage: blob %s was served but not kept: %s", self._flight.digest,
                        exc)
            raise
        self._committed = True

    async def abort(self) -> None:
        """Stop following; drop the parts sent (a no-op after a commit)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
        if not self._committed:
            await self._upload.abort()
