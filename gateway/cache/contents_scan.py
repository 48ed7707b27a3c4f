"""Putting the catalogue right from the store's files: a rebuild (into an empty catalogue)
and a reconciliation (after an unclean stop) are the same pass, one bucket at a time.

Files are listed and read on a helper thread, catalogue changes run on the catalogue's own
thread, one bucket per transaction, so live requests interleave and memory stays bounded.
Manifests and tags come first, blobs after: once every reference is known, `refs_known`
fires and eviction may trust the catalogue (a blob seen before its manifest would look
unreferenced).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import scan
from .contents import ObjectKind, Reconciled, references
from .contents_db import KIND_CODE, UPSERT, Catalogue, FoundManifest, Row
from .scan import Bucket, StoredObject

Run = Callable[..., Awaitable[Any]]  # runs a function on the catalogue's thread


def _diff_bucket(catalogue: Catalogue, data_dir: Path, bucket: Bucket,
                 found: list[StoredObject]) -> tuple[list[StoredObject], Reconciled]:
    """One bucket corrected: entries whose file is gone dropped, sizes put right, blobs the
    catalogue did not know added. Returns the unknown manifests (to read) and the counts."""
    on_disk = {f.digest: f for f in found}
    with catalogue.write():
        rows = {r.digest: r for r in catalogue.select(
            "SELECT id, namespace, kind, digest, size, last_access, tree_access, refcount "
            "FROM objects WHERE namespace = ? AND kind = ? AND digest >= ? AND digest < ? "
            "AND size IS NOT NULL", (bucket.namespace, KIND_CODE[bucket.kind],
                                     bucket.digest_prefix, bucket.digest_prefix + "~"))}
        # Look again before dropping: the file may have been committed (and its entry
        # added) since the listing.
        gone: list[Row] = [r for d, r in rows.items() if d not in on_disk and not
                           scan.object_path(data_dir, r.namespace, bucket.kind, d).exists()]
        catalogue.drop(gone)
        resized = [(f.size, rows[d].id) for d, f in on_disk.items()
                   if d in rows and rows[d].size != f.size]
        catalogue.db.executemany("UPDATE objects SET size = ? WHERE id = ?", resized)
        new = [f for d, f in on_disk.items() if d not in rows]
        if bucket.kind == "blob":
            catalogue.db.executemany(UPSERT, [(f.namespace, 0, f.digest, f.size, f.mtime,
                                               f.mtime) for f in new])
    counts = Reconciled(added=len(new), dropped=len(gone), resized=len(resized))
    return (new if bucket.kind == "manifest" else []), counts


def _read_manifests(found: list[StoredObject]) -> list[FoundManifest]:
    """Their references, from the files. A file's mtime stands in for its last access
    (atime is not kept on most mounts, and `cache verify` reads every file)."""
    out: list[FoundManifest] = []
    for f in found:
        stored = scan.read_manifest(f.path)
        if stored is not None:
            out.append((f.namespace, f.digest, f.size, None, references(stored[1]), f.mtime))
    return out


def _read_tags(data_dir: Path, namespace: str) -> list[tuple[str, str, str, str, str]]:
    out = []
    for stored in scan.tag_files(data_dir, namespace):
        entry = scan.read_tag(stored.path)
        if entry is not None:
            out.append((namespace, stored.repository, stored.tag, stored.view, entry.digest))
    return out


def _names_from_parents(catalogue: Catalogue) -> None:
    """A platform manifest belongs to the repositories of the index that holds it (the
    files record repositories only in tags)."""
    with catalogue.write():
        catalogue.db.execute("""WITH RECURSIVE down(id, repository) AS (
                SELECT manifest, repository FROM names
                UNION SELECT r.child, down.repository FROM down
                    JOIN refs r ON r.parent = down.id
                    JOIN objects o ON o.id = r.child AND o.kind = 1 AND o.size IS NOT NULL)
            INSERT OR IGNORE INTO names SELECT id, repository FROM down""")


def _namespaces(catalogue: Catalogue, data_dir: Path) -> list[str]:
    known = {ns for (ns,) in catalogue.db.execute("SELECT namespace FROM totals")}
    return sorted(known | set(scan.namespaces(data_dir)))


def _buckets(data_dir: Path, namespace: str, kind: ObjectKind) -> list[Bucket]:
    """Every sha256 bucket (an entry may outlive its directory), and what else is on disk."""
    every = {Bucket(namespace, kind, "sha256", f"{n:02x}") for n in range(256)}
    return sorted(every | set(scan.buckets(data_dir, namespace, kind)),
                  key=lambda b: (b.algorithm, b.prefix))


async def reconcile(run: Run, catalogue: Catalogue, data_dir: Path,
                    refs_known: Callable[[], None]) -> Reconciled:
    """One pass over the store; `refs_known()` once manifests and tags are in."""
    namespaces = await run(_namespaces, catalogue, data_dir)
    total = Reconciled()
    for kind in ("manifest", "blob"):
        for namespace in namespaces:
            for bucket in await asyncio.to_thread(_buckets, data_dir, namespace, kind):
                found = await asyncio.to_thread(scan.list_bucket, data_dir, bucket)
                new, counts = await run(_diff_bucket, catalogue, data_dir, bucket, found)
                if new:
                    await run(catalogue.add_manifests,
                              await asyncio.to_thread(_read_manifests, new))
                total = Reconciled(total.added + counts.added, total.dropped + counts.dropped,
                                   total.resized + counts.resized)
            if kind == "manifest":
                await run(catalogue.add_tags,
                          await asyncio.to_thread(_read_tags, data_dir, namespace))
        if kind == "manifest":
            await run(_names_from_parents, catalogue)
            refs_known()
    return total
