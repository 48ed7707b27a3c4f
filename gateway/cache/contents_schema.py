"""The sqlite file of the catalogue: its schema (versioned with `PRAGMA user_version`),
opening it in WAL mode, and telling a usable file from a missing, foreign, outdated or
corrupt one. Blocking; the caller runs it on the catalogue's own thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

FILE = "index.sqlite"
SCHEMA_VERSION = 1
BUSY_SECONDS = 10.0  # other processes write to the same file (WAL: one writer at a time)

# objects.size NULL: referenced by a cached manifest, not cached itself (a placeholder, kept
# only while referenced). refcount: how many cached manifests reference it (refs rows, kept
# by triggers). tree_access: the latest access of a manifest in its closure (blobs: their
# own), so roots sort least recently used first straight from an index. totals: running
# sums per namespace, kept by triggers, so usage() reads a few rows in any process.
_SCHEMA = f"""
BEGIN;
CREATE TABLE objects (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    kind INTEGER NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER,
    last_access REAL NOT NULL DEFAULT 0,
    tree_access REAL NOT NULL DEFAULT 0,
    refcount INTEGER NOT NULL DEFAULT 0,
    UNIQUE (namespace, kind, digest)
);
CREATE INDEX objects_roots ON objects (tree_access)
    WHERE refcount = 0 AND size IS NOT NULL;
CREATE INDEX objects_namespace_roots ON objects (namespace, tree_access)
    WHERE refcount = 0 AND size IS NOT NULL;
CREATE TABLE refs (
    parent INTEGER NOT NULL,
    child INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
CREATE INDEX refs_child ON refs (child);
CREATE TABLE names (
    manifest INTEGER NOT NULL,
    repository TEXT NOT NULL,
    PRIMARY KEY (manifest, repository)
) WITHOUT ROWID;
CREATE TABLE tags (
    namespace TEXT NOT NULL,
    repository TEXT NOT NULL,
    tag TEXT NOT NULL,
    view TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (namespace, repository, tag, view)
) WITHOUT ROWID;
CREATE INDEX tags_digest ON tags (namespace, digest);
CREATE TABLE totals (
    namespace TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    objects INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TRIGGER refs_added AFTER INSERT ON refs BEGIN
    UPDATE objects SET refcount = refcount + 1 WHERE id = NEW.child;
END;
CREATE TRIGGER refs_removed AFTER DELETE ON refs BEGIN
    UPDATE objects SET refcount = refcount - 1 WHERE id = OLD.child;
    DELETE FROM objects WHERE id = OLD.child AND refcount = 0 AND size IS NULL;
END;
CREATE TRIGGER objects_added AFTER INSERT ON objects WHEN NEW.size IS NOT NULL BEGIN
    INSERT INTO totals VALUES (NEW.namespace, NEW.size, 1) ON CONFLICT (namespace)
        DO UPDATE SET bytes = bytes + excluded.bytes, objects = objects + 1;
END;
CREATE TRIGGER objects_removed AFTER DELETE ON objects WHEN OLD.size IS NOT NULL BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, objects = objects - 1
        WHERE namespace = OLD.namespace;
END;
CREATE TRIGGER objects_resized AFTER UPDATE OF size ON objects
        WHEN OLD.size IS NOT NEW.size BEGIN
    INSERT INTO totals VALUES (NEW.namespace, coalesce(NEW.size, 0) - coalesce(OLD.size, 0),
                               (NEW.size IS NOT NULL) - (OLD.size IS NOT NULL))
        ON CONFLICT (namespace) DO UPDATE SET bytes = bytes + excluded.bytes,
                                              objects = objects + excluded.objects;
END;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection for the calling thread only; autocommit, transactions explicit."""
    db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL survives a process crash; a power cut may lose the last commits,
        # which the reconciliation after an unclean stop puts back from the files.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA cache_size = -32000")
    except BaseException:
        db.close()
        raise
    return db


def _cut_short(db: sqlite3.Connection, path: Path) -> bool:
    """Shorter than its header says: without a write-ahead log (a clean stop removes it),
    every page is in the file."""
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return False
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    return bool(path.stat().st_size < page_size * pages)


def problem(db: sqlite3.Connection, path: Path, *, thorough: bool) -> str | None:
    """Why this file cannot be used as it is ("schema", "corrupt"), None if it can, or
    "empty" for a new file that needs the schema. `thorough`: PRAGMA quick_check too
    (it reads the whole file: after an unclean stop only)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        return "empty" if tables == 0 else "schema"
    if version != SCHEMA_VERSION:
        return "schema"
    if _cut_short(db, path):
        return "corrupt"
    if thorough and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
        return "corrupt"
    return None


def create(db: sqlite3.Connection) -> None:
    db.executescript(_SCHEMA)


def remove_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def open_database(path: Path, *, thorough: bool) -> tuple[sqlite3.Connection, str | None]:
    """The catalogue's file, usable: (connection, why it was made anew or None). Reasons:
    "missing" (no file), "schema" (another version or not ours), "corrupt"."""
    reason = None if path.exists() else "missing"
    if reason is None:
        db: sqlite3.Connection | None = None
        try:
            db = connect(path)
            found = problem(db, path, thorough=thorough)
            if found is None:
                return db, None
            reason = "missing" if found == "empty" else found
        except sqlite3.DatabaseError:
            reason = "corrupt"
        if db is not None:
            db.close()
        remove_files(path)
    db = connect(path)
    try:
        create(db)
    except BaseException:
        db.close()
        raise
    return db, reason
