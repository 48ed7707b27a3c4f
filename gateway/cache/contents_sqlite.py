"""The catalogue in `<data>/index.sqlite` (WAL): `Contents` and `Browsable` for the size
cap and the `cache` command, shared by every process on the data directory.

Every sqlite call runs on one dedicated thread (never on the event loop). Accesses are
kept in memory and written in batches. A missing, foreign or corrupt file is made anew
and refilled from the store; after an unclean stop the catalogue is reconciled with the
store in the background, so `open` stays fast however large the index is.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..metrics import Metrics
from . import contents_scan, scan
from .contents import (
    Browsable,
    CachedImage,
    Contents,
    ContentsError,
    Entry,
    ObjectKind,
    Reconciled,
    RepositoryUsage,
    Root,
    Target,
    Usage,
)
from .contents_db import Catalogue
from .contents_schema import FILE, open_database, remove_files
from .policy import WIDE
from .spool import ProcessDir

T = TypeVar("T")
log = logging.getLogger("gateway.cache.index")
_MAX_PENDING = 100_000  # distinct objects touched before a flush is due anyway
_CORRUPT_CODES = ("SQLITE_CORRUPT", "SQLITE_NOTADB")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Processes opening the index one at a time: one of them rebuilds a broken file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class SqliteContents:
    """`await open()` before use and `await close()` after; one instance per process.

    `<data>/.index/` holds the open lock, one locked directory per process that has the
    index open (a directory left unlocked is an unclean stop), and the markers `rescan`
    (reconcile with the store at the next open) and `corrupt` (make the file anew)."""

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None, flush_interval: float = 2.0,
                 store_files: bool = True, primary: bool = True) -> None:
        self.data_dir = Path(data_dir)
        # False: the store is remote (S3), the data directory holds none of its objects;
        # a scan of it would drop every entry, so the catalogue is trusted as it is.
        self._store_files = store_files
        self.path = self.data_dir / FILE
        self.rebuilt: str | None = None  # why open() made the file anew, if it did
        self.rebuilds = 0
        self._clock = clock
        self._metrics = metrics
        self._flush_interval = flush_interval
        self._state = self.data_dir / ".index"
        self._session = ProcessDir(self._state / "sessions")
        self._executor: ThreadPoolExecutor | None = None
        self._catalogue: Catalogue | None = None
        self._pending: dict[tuple[str, ObjectKind, str], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scan: asyncio.Task[Reconciled] | None = None
        self._scan_lock = asyncio.Lock()
        self._refs_known = asyncio.Event()
        self._failed_at = -1e9
        # Several workers on one index: the primary reconciles when asked to; another
        # one only after an unclean stop it found itself (a worker that was killed).
        self._primary = primary

    # ------------------------------------------------------------ plumbing

    @property
    def _db(self) -> Catalogue:
        if self._catalogue is None:
            raise ContentsError("the index is not open")
        return self._catalogue

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise ContentsError("the index is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _failed(self, exc: sqlite3.Error, doing: str) -> None:
        """Note a failure for the next open: reconcile, or make the file anew."""
        corrupt = getattr(exc, "sqlite_errorname", "") in _CORRUPT_CODES
        marker = self._state / ("corrupt" if corrupt else "rescan")
        with suppress(OSError):
            marker.touch()
        now = time.monotonic()
        if now - self._failed_at > 60:  # a broken file fails every call: say so once a minute
            self._failed_at = now
            log.warning("index: %s failed (%s); the store is unaffected, the index is %s at "
                        "the next start", doing, exc, "rebuilt" if corrupt else "reconciled")

    async def _write(self, fn: Callable[..., None], *args: Any) -> None:
        """A change the store already holds: losing it costs only accuracy until the next
        reconciliation, so a failure never reaches the request that made it."""
        try:
            await self._run(fn, *args)
        except sqlite3.Error as exc:
            self._failed(exc, fn.__name__)
        except ContentsError:  # after close (a transfer that ended during shutdown)
            with suppress(OSError):
                (self._state / "rescan").touch()

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self._run(fn, *args)
        except sqlite3.Error as exc:
            self._failed(exc, fn.__name__)
            raise ContentsError(f"index: {exc}") from exc

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ open and close

    def _open_sync(self) -> tuple[str | None, bool]:
        self._state.mkdir(parents=True, exist_ok=True)
        with _locked(self._state / "lock"):
            dead = self._session.open()  # the sessions of processes that did not close
            forced = None
            if (self._state / "corrupt").exists():
                remove_files(self.path)
                forced = "corrupt"
            db, reason = open_database(self.path, thorough=bool(dead))
            (self._state / "corrupt").unlink(missing_ok=True)
            reason = forced or reason
            if reason == "missing" and not scan.namespaces(self.data_dir):
                reason = None  # a new data directory: nothing to rebuild
            if reason is not None or dead:
                (self._state / "rescan").touch()
            self._catalogue = Catalogue(db)
            if not self._primary and not dead and reason is None:
                return None, False
            return reason, (self._state / "rescan").exists()

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="index-sqlite")
        try:
            reason, scan_needed = await self._run(self._open_sync)
        except BaseException as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            if isinstance(exc, sqlite3.Error | OSError):
                raise ContentsError(f"index: cannot open {self.path}: {exc}") from exc
            raise
        if reason is not None:
            self.rebuilt, self.rebuilds = reason, self.rebuilds + 1
            if self._metrics is not None:
                self._metrics.index_rebuilds.labels(reason).inc()
            log.warning("index: %s was %s; rebuilding it from the store in the background",
                        self.path, {"missing": "missing", "schema": "of another version"}.get(
                            reason, "corrupt"))
        if scan_needed and self._store_files:
            self._scan = self._spawn(self._background_scan(reason is None))
        else:
            self._refs_known.set()
        self._spawn(self._flush_loop())

    async def _background_scan(self, after_crash: bool) -> Reconciled:
        started = time.monotonic()
        try:
            found = await self.reconcile()
        except Exception as exc:  # eviction then trusts the index as it is; next start retries
            log.warning("index: %s the store failed (%s)", "reconciling with" if after_crash
                        else "rebuilding from", exc, exc_info=not isinstance(exc, ContentsError))
            self._refs_known.set()
            return Reconciled()
        log.info("index: %s the store in %.1fs: %d added, %d dropped, %d resized",
                 "reconciled with" if after_crash else "rebuilt from",
                 time.monotonic() - started, found.added, found.dropped, found.resized)
        return found

    def _close_sync(self) -> None:
        if self._catalogue is not None:
            self._catalogue.db.close()  # kept: a late write fails as sqlite3.Error
        self._session.close()  # a clean stop

    async def close(self) -> None:
        if self._executor is None:
            return
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task
        await self.flush()
        try:
            await self._run(self._close_sync)
        finally:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def reconciling(self) -> bool:
        """A rebuild or reconciliation started by `open` is still running."""
        return self._scan is not None and not self._scan.done()

    async def settled(self) -> Reconciled:
        if self._scan is None:
            return Reconciled()
        return await asyncio.shield(self._scan)

    async def reconcile(self) -> Reconciled:
        async with self._scan_lock:
            marker = self._state / "rescan"
            stamp = await asyncio.to_thread(_stamp, marker)
            await self.flush()
            try:
                found = await contents_scan.reconcile(self._run, self._db, self.data_dir,
                                                      self._refs_known.set)
            except sqlite3.Error as exc:
                self._failed(exc, "reconcile")
                raise ContentsError(f"index: {exc}") from exc
            if stamp is not None and await asyncio.to_thread(_stamp, marker) == stamp:
                await asyncio.to_thread(marker.unlink, True)  # nobody asked for another
            return found

    # ------------------------------------------------------------ accesses

    def touch(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        self._pending[(namespace, kind, digest)] = self._clock()
        if len(self._pending) == _MAX_PENDING:
            self._spawn(self.flush())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending or self._executor is None:
            return  # after close, accesses are dropped: only their order is lost
        batch, self._pending = self._pending, {}
        await self._write(self._db.touches, [(*key, when) for key, when in batch.items()])

    # ------------------------------------------------------------ Contents

    async def add_blob(self, namespace: str, digest: str, size: int) -> None:
        await self._write(self._db.add_blobs, [(namespace, digest, size, self._clock())])

    async def add_manifest(self, namespace: str, digest: str, size: int, repository: str,
                           children: Sequence[tuple[ObjectKind, str]]) -> None:
        await self._write(self._db.add_manifests, [
            (namespace, digest, size, repository, tuple(children), self._clock())])

    async def add_tag(self, namespace: str, repository: str, tag: str, digest: str,
                      view: str = WIDE) -> None:
        await self._write(self._db.add_tags, [(namespace, repository, tag, view, digest)])

    async def usage(self) -> Usage:
        return await self._read(self._db.usage)

    async def roots(self, *, namespace: str | None = None, limit: int = 100,
                    idle_before: float | None = None) -> list[Root]:
        if not self._refs_known.is_set():
            return []  # rebuilding: a blob whose manifest is not read yet looks unreferenced
        await self.flush()
        return await self._read(self._db.roots, namespace, limit, idle_before)

    async def remove(self, root: Root) -> list[Entry]:
        await self.flush()
        return await self._read(self._db.remove, root)

    async def forget(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        await self._write(self._db.forget, namespace, kind, digest)

    # ------------------------------------------------------------ Browsable

    async def find(self, namespace: str, kind: ObjectKind, digest: str) -> Entry | None:
        found = await self._read(self._db.row, namespace, kind, digest)
        return found.entry() if found is not None and found.size is not None else None

    async def referrers(self, namespace: str, kind: ObjectKind, digest: str) -> list[Entry]:
        return await self._read(self._db.referrers, namespace, kind, digest)

    async def root_of(self, namespace: str, kind: ObjectKind, digest: str) -> Root | None:
        await self.flush()
        return await self._read(self._db.root_of, namespace, kind, digest)

    async def tagged(self, namespace: str, repository: str, tag: str) -> list[str]:
        return await self._read(self._db.tagged, namespace, repository, tag)

    async def images(self, *, namespace: str | None = None) -> list[CachedImage]:
        await self.flush()
        return await self._read(self._db.images, namespace)

    async def loose_blobs(self, *, namespace: str | None = None) -> tuple[int, int]:
        return await self._read(self._db.loose_blobs, namespace)

    async def repositories(self, *, namespace: str | None = None,
                           limit: int = 20) -> list[RepositoryUsage]:
        return await self._read(self._db.repositories, namespace, limit)

    async def preview(self, plan: Sequence[Target], keep: Callable[[Root], bool]
                      ) -> list[tuple[Target, Root]]:
        if not self._refs_known.is_set():
            return []
        await self.flush()
        return await self._read(self._db.preview, plan, keep)


if TYPE_CHECKING:  # mypy holds the class to both protocols
    def _conforms(contents: SqliteContents) -> tuple[Contents, Browsable]:
        return contents, contents
