"""The small storage interface the cache is written against.

Keys are relative, '/'-separated paths chosen by the cache (`<namespace>/blobs/...`).
A store keeps only what was committed whole; it never verifies digests itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class BlobStore(Protocol):
    spool_dir: Path
    """Where in-flight fetches are spooled; commit() moves a spool file into the store."""

    async def stat(self, key: str) -> int | None:
        """Size of the committed object, or None."""

    def local_path(self, key: str) -> Path | None:
        """A local file holding the object (for sendfile), or None for remote stores."""

    async def read(self, key: str) -> bytes | None:
        """A small object's bytes (manifests, tags), or None."""

    async def write(self, key: str, data: bytes) -> None:
        """Store a small object atomically."""

    async def commit(self, key: str, spool: Path) -> None:
        """Move a complete, verified spool file into place atomically."""

    async def delete(self, key: str) -> None:
        """Forget an object; missing is fine."""
