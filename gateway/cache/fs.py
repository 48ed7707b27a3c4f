"""The embedded filesystem store: one directory tree under the data directory.

Writes are temp file + fsync + rename, so after a crash only complete objects
remain; `open()` clears the spool of leftovers. All disk I/O runs off the loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path


class FsStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool_dir = root / ".spool"

    def _path(self, key: str) -> Path:
        # Keys are built by the cache from validated names and digests; refuse anything else.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return self.root / key

    def open_sync(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        self.spool_dir.mkdir()

    async def open(self) -> None:
        await asyncio.to_thread(self.open_sync)

    async def stat(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None

    def local_path(self, key: str) -> Path:
        return self._path(key)

    async def read(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            return None

    def _write_sync(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.spool_dir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def write(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_sync, key, data)

    def _commit_sync(self, key: str, spool: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool, path)

    async def commit(self, key: str, spool: Path) -> None:
        await asyncio.to_thread(self._commit_sync, key, spool)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)
