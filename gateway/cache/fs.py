"""The embedded filesystem store: one directory tree under the data directory.

Writes are temp file + fsync + rename, so after a crash only complete objects remain;
temp files live in the process's own scratch directory. All disk I/O runs off the loop.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 1 << 20


class FsStore:
    """Implements BlobStore and LocalFiles."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.root = root
        self.scratch = scratch  # same filesystem as root: renames are atomic

    def _path(self, key: str) -> Path:
        # Keys are built by the cache from validated names and digests; refuse anything else.
        if key.startswith("/") or ".." in key.split("/") or key.startswith("."):
            raise ValueError(f"bad store key {key!r}")
        return self.root / key

    def local_path(self, key: str) -> Path:
        return self._path(key)

    async def stat(self, key: str) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None

    async def read(self, key: str, start: int = 0, end: int | None = None
                   ) -> AsyncIterator[bytes]:
        fd = await asyncio.to_thread(os.open, self._path(key), os.O_RDONLY)
        try:
            offset = start
            while end is None or offset < end:
                want = CHUNK if end is None else min(CHUNK, end - offset)
                data = await asyncio.to_thread(os.pread, fd, want, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            os.close(fd)

    async def get(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            return None

    def _put_sync(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.scratch)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_sync, key, data)

    def upload(self, key: str) -> FsUpload:
        return FsUpload(self, key)

    def _adopt_sync(self, key: str, file: Path) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, path)

    async def adopt(self, key: str, file: Path) -> None:
        await asyncio.to_thread(self._adopt_sync, key, file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)


class FsUpload:
    """A temp file in the scratch directory, renamed into place on commit."""

    def __init__(self, store: FsStore, key: str) -> None:
        self._store = store
        self._key = key
        self._fd = -1
        self._tmp: Path | None = None

    def _open(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self._store.scratch)
        self._fd, self._tmp = fd, Path(tmp)

    def _write_sync(self, data: bytes) -> None:
        if self._fd < 0:
            self._open()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._write_sync, data)

    def _commit_sync(self) -> None:
        if self._fd < 0:
            self._open()
        assert self._tmp is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self._store._adopt_sync(self._key, self._tmp)
        self._tmp = None

    async def commit(self) -> None:
        await asyncio.to_thread(self._commit_sync)

    def _abort_sync(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    async def abort(self) -> None:
        await asyncio.to_thread(self._abort_sync)
