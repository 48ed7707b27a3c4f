"""The small storage interface the cache is written against, and the keys it uses.

A store keeps only what was committed whole; it never verifies digests itself (the
flight does). What only some stores can do is an optional capability, checked with
`isinstance`: serving a local file (sendfile) or redirecting to a presigned URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..reference import Digest


class Upload(Protocol):
    """One object being written; invisible under its key until `commit()`."""

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None:
        """Drop what was written; safe to call after a failed write or twice."""


class BlobStore(Protocol):
    async def stat(self, key: str) -> int | None:
        """Size of the committed object, or None."""

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of a committed object; FileNotFoundError if there is none."""

    async def get(self, key: str) -> bytes | None:
        """A small object whole (manifests, tags), or None."""

    async def put(self, key: str, data: bytes) -> None:
        """Store a small object atomically."""

    def upload(self, key: str) -> Upload:
        """Begin writing a (large) object under `key`."""

    async def delete(self, key: str) -> None:
        """Forget an object; missing is fine."""


@runtime_checkable
class LocalFiles(Protocol):
    """A store whose objects are files on this machine: served by sendfile, and a verified
    spool file moves in by rename instead of being copied."""

    def local_path(self, key: str) -> Path: ...

    async def adopt(self, key: str, file: Path) -> None:
        """Move a complete local file (on the same filesystem) in under `key`."""


@runtime_checkable
class Redirecting(Protocol):
    """A store that can send clients to fetch an object themselves (a presigned URL)."""

    async def redirect_url(self, key: str, size: int) -> str | None:
        """Where the client may fetch the object of `size` bytes; None: serve it here."""


class StoredBody(Protocol):
    """One answered read of a committed object: bytes [start, end) of its `size`."""

    size: int
    start: int
    end: int

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


@runtime_checkable
class SizedReads(Protocol):
    """A remote store whose read also tells the object's size: a blob GET costs it one
    request (no stat first). `byte_range` is an HTTP Range value (`bytes=0-99`,
    `bytes=100-`, `bytes=-50`) or None for the whole object."""

    async def open_read(self, key: str, byte_range: str | None) -> StoredBody | None:
        """The read under way, or None if there is no such object."""


def blob_key(namespace: str, digest: Digest) -> str:
    return f"{namespace}/blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def manifest_key(namespace: str, digest: Digest) -> str:
    return f"{namespace}/manifests/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def tag_key(namespace: str, repository: str, tag: str, view: str) -> str:
    return f"{namespace}/tags/{repository}/{view}/{tag}"
