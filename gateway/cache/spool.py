"""A scratch directory owned by one process: in-flight spool files and temp files.

Each process makes its own `<parent>/<pid>-<random>/`, holds an exclusive lock on a
file in it for as long as it runs, and at start removes only the directories whose
owner is gone (their lock can be taken). So processes sharing one data directory
never delete each other's live transfers. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import time
from pathlib import Path

_LOCK = ".owner"


class ProcessDir:
    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self.path = parent / f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd = -1

    def open(self) -> list[Path]:
        """Make and lock our directory; sweep leftovers of dead owners (returned)."""
        self.path.mkdir(parents=True)
        fd = os.open(self.path / _LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._lock_fd = fd
        return self.sweep()

    def sweep(self) -> list[Path]:
        swept = []
        for entry in os.scandir(self.parent):
            path = Path(entry.path)
            if path == self.path:
                continue
            if entry.is_dir(follow_symlinks=False):
                if _owner_alive(path):
                    continue
                shutil.rmtree(path, ignore_errors=True)
            else:  # a spool file from before spools were per process
                path.unlink(missing_ok=True)
            swept.append(path)
        return swept

    def close(self) -> None:
        if self._lock_fd >= 0:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1


def _owner_alive(directory: Path) -> bool:
    try:
        fd = os.open(directory / _LOCK, os.O_RDONLY)
    except FileNotFoundError:
        # Being made right now (mkdir before the lock) or half swept: a directory with
        # no lock file is only old enough to remove once its owner never locked it.
        return _young(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # a lock we took is released with it
    return False


def _young(directory: Path, seconds: float = 60.0) -> bool:
    try:
        return time.time() - directory.stat().st_mtime < seconds
    except FileNotFoundError:
        return False
