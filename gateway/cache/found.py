"""What a look for a committed blob finds: an open local file, a store object (its read
maybe begun), or a small blob's verified bytes in memory; and the helpers that make them.

Values and pure helpers only; the Blobs class (blobs.py) decides which to make.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..reference import Digest
from .store import StoredBody

# Blobs this small (image configs: a client GETs one per image, often) are kept in memory
# once read whole from the store and verified: a warm GET of one then costs what a cached
# manifest costs, no thread hop to open the file, no sendfile, no store request.
SMALL_BLOB = 128 << 10
SMALL_MEMORY = 16 << 20  # bytes of small blobs kept per process
# Another process (a worker, `registry-gateway cache rm`) may delete a blob without this
# one hearing of it: a kept blob is looked up in the store again after this many seconds.
# (An eviction in this process drops it at once: `forget`.)
SMALL_RECHECK = 1.0


@dataclass(frozen=True, slots=True)
class CachedBlob:
    """A committed blob in a store without local files: read it through the store. With
    a `body`, its read is under way already (a store with SizedReads: one request)."""

    key: str
    size: int
    body: StoredBody | None = field(default=None, compare=False)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()


@dataclass(frozen=True, slots=True)
class MemoryBlob:
    """A small committed blob, read whole and verified against its digest: its bytes."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class OpenBlob:
    """A committed blob in a local file, opened: the caller sends it and closes it."""

    file: IO[bytes]
    size: int


def verified(data: bytes, digest: Digest) -> bool:
    return hashlib.new(digest.algorithm, data).hexdigest() == digest.hex


async def read_whole(body: StoredBody) -> bytes:
    try:
        async with contextlib.aclosing(body.chunks()) as chunks:  # type: ignore[type-var]
            return b"".join([chunk async for chunk in chunks])
    finally:
        body.close()


def open_local(path: Path, digest: Digest) -> tuple[IO[bytes], int] | bytes:
    """The blob's file, opened, and its size; a small one read whole and verified instead
    (its bytes). A small one whose bytes do not match is opened as before: not kept."""
    file = open(path, "rb")  # noqa: SIM115  (the caller closes it after sending)
    try:
        size = os.fstat(file.fileno()).st_size
        if size <= SMALL_BLOB:
            data = file.read()
            if len(data) == size and verified(data, digest):
                file.close()
                return data
            file.seek(0)
    except BaseException:
        file.close()
        raise
    return file, size
