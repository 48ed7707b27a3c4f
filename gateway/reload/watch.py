"""Whether files changed on disk: their (device, inode, size, mtime) looked at off the loop.

Polling, so it works on every filesystem and sees an editor's save by rename (a new
inode) as well as a write in place. Reads no file's content.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

Signature = tuple[int, int, int, int] | None  # None: the file is missing


def signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def signatures(paths: Iterable[Path]) -> dict[Path, Signature]:
    """Blocking (a stat per file): call in a thread."""
    return {path: signature(path) for path in paths}


def changed(seen: Mapping[Path, Signature], now: Mapping[Path, Signature]) -> list[Path]:
    """The files whose signature differs from the one last read. A file that is missing
    now is not a change: an editor that saves by "rename the old away, write the new"
    has it missing for a moment, and reading then would only report an error."""
    return [path for path, sig in now.items() if sig is not None and seen.get(path) != sig]
