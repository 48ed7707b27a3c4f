"""What every `cache` command stands on: the data directory's catalogue, opened as one more
process on it (and settled: rebuilt or reconciled first if it must be), and its store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..cache import FsStore
from ..cache.contents import Entry, Reconciled
from ..cache.contents_sqlite import SqliteContents
from ..cache.store import blob_key, manifest_key
from ..config import Config
from ..reference import parse_digest
from .report import Names


@dataclass
class Session:
    data_dir: Path
    config: Config
    contents: SqliteContents
    store: FsStore
    names: Names
    out: TextIO
    err: TextIO
    settled: Reconciled  # what opening it corrected (after an unclean stop)

    async def delete(self, entries: list[Entry]) -> None:
        """Files of objects the catalogue let go of."""
        for entry in entries:
            key = (blob_key if entry.kind == "blob" else manifest_key)(
                entry.namespace, parse_digest(entry.digest))
            await self.store.delete(key)


@asynccontextmanager
async def opened(data_dir: Path, config: Config, out: TextIO,
                 err: TextIO) -> AsyncIterator[Session]:
    contents = SqliteContents(data_dir)
    await contents.open()
    try:
        if contents.reconciling and contents.rebuilt is None:  # a rebuild is logged
            err.write("the index was not closed cleanly: reconciling it with the files...\n")
        settled = await contents.settled()
        # Deleting needs no scratch directory: nothing is written through this store.
        yield Session(data_dir, config, contents, FsStore(data_dir, data_dir / ".spool"),
                      Names(config), out, err, settled)
    finally:
        await contents.close()
