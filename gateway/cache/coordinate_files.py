"""Single flight across the worker processes on one data directory: a lock file per key
under `<data>/.flight/` (flock: the kernel lets go of a dead leader's lock, so a follower
can take over) that also holds, memory-mapped, the leader's progress record.

The record is rewritten whole with a CRC, so a follower never acts on a torn one. Lock
files are unlinked by their holder before the lock is let go; whoever opens a lock
checks it still is the file at its path. Disk calls run off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import RegistryError
from .coordinate import FAILED, STARTING, STREAMING, VERIFIED, Follow, Lead, Progress, Published

RECORD = 4096
# crc, state, generation, size (-1: unknown), written, error status, then the lengths of
# the spool path, the error code and the error message that follow.
_HEAD = struct.Struct("<IIQqqHHHH")
_MAX_TEXT = RECORD - _HEAD.size
POLL = 0.02  # seconds between tries of a lock another process holds
STALE = 60.0  # a lock file nobody holds and nobody touched for this long is swept


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _try_lock(path: Path, operation: int = fcntl.LOCK_EX) -> tuple[int, bool]:
    """Open `path` (made if missing) and try its lock: (fd, True) if held now, (fd,
    False) if another process holds it (fd: the file it holds). Blocking: a thread."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the directory went (a data directory emptied by hand)
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd, True
        os.close(fd)  # its holder unlinked it while we opened it: the next one


def _relock(fd: int) -> bool:
    """Try again the lock of the file `fd` is (a thread): True if held now."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _retry_lock(fd: int, path: Path) -> tuple[int, bool]:
    """`_try_lock` again for a waiter holding `fd` (a thread); a file its holder has
    unlinked is done with, so the waiter goes on with the one at `path`."""
    held = _relock(fd)
    if _same_file(fd, path):
        return fd, held
    os.close(fd)
    return _try_lock(path)


def _unlink_and_close(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        if _same_file(fd, path):
            path.unlink()
    os.close(fd)  # lets the lock go


def encode(progress: Progress) -> bytes:
    spool = os.fsencode(progress.spool)
    code, message, status = progress.error or ("", "", 0)
    code_b = code.encode()[:64]
    message_b = message.encode()[:max(_MAX_TEXT - len(spool) - len(code_b), 0)]
    tail = spool + code_b + message_b
    size = -1 if progress.size is None else progress.size
    body = _HEAD.pack(0, progress.state, progress.generation, size, progress.written, status,
                      len(spool), len(code_b), len(message_b))[4:] + tail
    return struct.pack("<I", zlib.crc32(body)) + body


def decode(data: bytes) -> Progress | None:
    """A record, or None if it is not a whole one (being written, or never was)."""
    try:
        crc, state, generation, size, written, status, n_spool, n_code, n_msg = \
            _HEAD.unpack_from(data)
    except struct.error:
        return None
    end = _HEAD.size + n_spool + n_code + n_msg
    if end > len(data) or n_spool == 0 or zlib.crc32(data[4:end]) != crc:
        return None
    at = _HEAD.size
    spool = Path(os.fsdecode(data[at:at + n_spool]))
    code = data[at + n_spool:at + n_spool + n_code].decode(errors="replace")
    message = data[at + n_spool + n_code:end].decode(errors="replace")
    return Progress(generation, state, None if size < 0 else size, written, spool,
                    (code, message, status) if state == FAILED else None)


class FileLead:
    shared = True

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._map: mmap.mmap | None = None
        self.generation = secrets.randbits(63)
        self._last = b""

    def _map_sync(self) -> None:
        os.ftruncate(self._fd, RECORD)
        self._map = mmap.mmap(self._fd, RECORD)

    async def start(self) -> None:
        await asyncio.to_thread(self._map_sync)

    def publish(self, transfer: Published) -> None:
        if self._map is None:
            return
        if transfer.error is not None and not transfer.done:
            error = transfer.error
            state, detail = FAILED, ((error.code, error.message, error.status)
                                     if isinstance(error, RegistryError)
                                     else ("UNAVAILABLE", "the upstream fetch failed", 502))
        else:
            state = VERIFIED if transfer.done else (
                STREAMING if transfer.headers_known else STARTING)
            detail = None
        record = encode(Progress(self.generation, state, transfer.size, transfer.written,
                                 transfer.spool, detail))
        if record != self._last:  # a memory write: no system call on the loop
            self._map[:len(record)] = record
            self._last = record

    async def release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        mapped, self._map = self._map, None  # a late publish() is then a no-op
        if mapped is not None:
            mapped.close()
        await asyncio.to_thread(_unlink_and_close, fd, self._path)


class FileFollow:
    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._map: mmap.mmap | None = None

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None:
            try:  # the leader sizes the file right after taking the lock
                self._map = mmap.mmap(self._fd, RECORD, access=mmap.ACCESS_READ)
            except (ValueError, OSError):
                return None
        return self._map

    def progress(self) -> Progress | None:
        mapped = self._mapped()
        return decode(mapped[:]) if mapped is not None else None

    async def leader_gone(self) -> Lead | None:
        if not await asyncio.to_thread(_relock, self._fd):
            return None
        last = self.progress()
        if last is not None and last.state in (VERIFIED, FAILED):
            return None  # it ended, and let go: the caller reads the end from the record
        # Ours now: the leader stopped mid-transfer (kill -9). The file stays ours.
        fd, self._fd = self._fd, -1
        if self._map is not None:
            self._map.close()
            self._map = None
        lead = FileLead(fd, self._path)
        await lead.start()
        return lead

    async def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            await asyncio.to_thread(os.close, fd)


class FileCoordinator:
    """Implements Coordinator for the processes sharing `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / ".flight"

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".lock")

    async def open(self, *, sweep: bool) -> None:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        if sweep:
            await asyncio.to_thread(self._sweep)

    def _sweep(self) -> int:
        """Lock files of leaders that died and whose key nobody asked for since."""
        swept = 0
        for entry in os.scandir(self.directory):
            path = Path(entry.path)
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime < STALE:
                    continue
                fd, held = _try_lock(path)
                if held:
                    swept += 1
                    _unlink_and_close(fd, path)
                else:
                    os.close(fd)
        return swept

    async def claim(self, key: str) -> Lead | Follow:
        path = self._path(key)
        fd, held = await asyncio.to_thread(_try_lock, path)
        if not held:
            return FileFollow(fd, path)
        lead = FileLead(fd, path)
        try:
            await lead.start()
        except BaseException:
            await lead.release()
            raise
        return lead

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[bool]:
        path = self._path(key)
        fd, held = await asyncio.to_thread(_try_lock, path)
        waited = not held
        try:
            while not held:
                await asyncio.sleep(POLL)
                fd, held = await asyncio.to_thread(_retry_lock, fd, path)
            yield waited
        finally:
            if fd >= 0:
                await asyncio.to_thread(_unlink_and_close, fd, path)

    async def close(self) -> None:
        pass

