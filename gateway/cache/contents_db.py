"""The catalogue's statements on one sqlite connection: adding objects and references,
batched accesses, roots and what each frees, removal, and the operator's listings.

Blocking and bound to the thread that opened the connection (SqliteContents runs every
call on its one worker thread). Knows nothing of files: scans feed it what they found.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass

from .contents import (
    CachedImage,
    Entry,
    ObjectKind,
    RepositoryUsage,
    Root,
    Target,
    Usage,
)

KIND_CODE: dict[ObjectKind, int] = {"blob": 0, "manifest": 1}
KIND_NAME: tuple[ObjectKind, ObjectKind] = ("blob", "manifest")
MANIFEST = 1
_COLUMNS = "id, namespace, kind, digest, size, last_access, tree_access, refcount"
_PAGE = 500
UPSERT = """INSERT INTO objects (namespace, kind, digest, size, last_access, tree_access)
    VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, kind, digest) DO UPDATE SET
    size = excluded.size, last_access = max(last_access, excluded.last_access),
    tree_access = max(tree_access, excluded.tree_access)"""
Touch = tuple[str, ObjectKind, str, float]  # namespace, kind, digest, when
# namespace, digest, size, repository, children, when
FoundManifest = tuple[str, str, int, str | None, Sequence[tuple[ObjectKind, str]], float]


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    namespace: str
    kind: int
    digest: str
    size: int | None  # None: a placeholder (referenced, not cached)
    last_access: float
    tree_access: float
    refcount: int

    def entry(self) -> Entry:
        return Entry(self.namespace, KIND_NAME[self.kind], self.digest, self.size or 0,
                     self.last_access)


class Catalogue:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @contextmanager
    def write(self) -> Iterator[None]:
        """One transaction that takes the write lock at once (no upgrade deadlocks)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Several reads that see one state of the file."""
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def select(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        return [Row(*r) for r in self.db.execute(sql, args)]

    def row(self, namespace: str, kind: ObjectKind, digest: str) -> Row | None:
        found = self.select(f"SELECT {_COLUMNS} FROM objects WHERE namespace = ? AND kind = ? "
                           "AND digest = ?", (namespace, KIND_CODE[kind], digest))
        return found[0] if found else None

    # ------------------------------------------------------------ writes

    def _object(self, namespace: str, kind: int, digest: str, size: int, when: float) -> int:
        found = self.db.execute(UPSERT + " RETURNING id",
                                (namespace, kind, digest, size, when, when)).fetchone()
        return int(found[0])

    def _id_or_placeholder(self, namespace: str, kind: ObjectKind, digest: str) -> int:
        self.db.execute("INSERT OR IGNORE INTO objects (namespace, kind, digest) "
                        "VALUES (?, ?, ?)", (namespace, KIND_CODE[kind], digest))
        found = self.db.execute("SELECT id FROM objects WHERE namespace = ? AND kind = ? AND "
                                "digest = ?", (namespace, KIND_CODE[kind], digest)).fetchone()
        return int(found[0])

    def _raise_tree(self, manifest: int, when: float) -> None:
        """A manifest's closure was read at `when`: so were the closures holding it."""
        self.db.execute("""WITH RECURSIVE up(id) AS (
                VALUES (?) UNION SELECT r.parent FROM refs r JOIN up ON r.child = up.id)
            UPDATE objects SET tree_access = ? WHERE tree_access < ?
                AND id IN (SELECT id FROM up)""", (manifest, when, when))

    def add_blobs(self, blobs: Iterable[tuple[str, str, int, float]]) -> None:
        """(namespace, digest, size, when) each."""
        with self.write():
            self.db.executemany(UPSERT, ((ns, 0, d, size, t, t) for ns, d, size, t in blobs))

    def add_manifests(self, manifests: Iterable[FoundManifest]) -> None:
        with self.write():
            for found in manifests:
                self._add_manifest(*found)

    def _add_manifest(self, namespace: str, digest: str, size: int, repository: str | None,
                      children: Sequence[tuple[ObjectKind, str]], when: float) -> None:
        manifest = self._object(namespace, MANIFEST, digest, size, when)
        if repository:
            self.db.execute("INSERT OR IGNORE INTO names VALUES (?, ?)", (manifest, repository))
        for kind, child in children:
            self.db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?)",
                            (manifest, self._id_or_placeholder(namespace, kind, child)))
        newest = self.db.execute(
            "SELECT max(o.tree_access) FROM refs r JOIN objects o ON o.id = r.child "
            "WHERE r.parent = ? AND o.kind = 1 AND o.size IS NOT NULL", (manifest,)).fetchone()
        self._raise_tree(manifest, max(when, newest[0] or 0.0))

    def add_tags(self, tags: Iterable[tuple[str, str, str, str, str]]) -> None:
        """(namespace, repository, tag, view, digest) each."""
        with self.write():
            for tag in tags:
                self._add_tag(*tag)

    def _add_tag(self, namespace: str, repository: str, tag: str, view: str,
                 digest: str) -> None:
        self.db.execute("INSERT INTO tags VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                        "digest = excluded.digest", (namespace, repository, tag, view, digest))
        self.db.execute("INSERT OR IGNORE INTO names SELECT id, ? FROM objects WHERE "
                        "namespace = ? AND kind = 1 AND digest = ? AND size IS NOT NULL",
                        (repository, namespace, digest))

    def touches(self, batch: Iterable[Touch]) -> None:
        with self.write():
            for namespace, kind, digest, when in batch:
                found = self.db.execute(
                    "UPDATE objects SET last_access = max(last_access, ?), tree_access = "
                    "max(tree_access, ?) WHERE namespace = ? AND kind = ? AND digest = ? "
                    "RETURNING id", (when, when, namespace, KIND_CODE[kind], digest)).fetchone()
                if found is not None and kind == "manifest":
                    self._raise_tree(found[0], when)

    def drop(self, rows: Iterable[Row]) -> None:
        """Objects leave the catalogue: a manifest's references, names and tags with it; a
        row still referenced stays as a placeholder."""
        rows = list(rows)
        for row in rows:
            if row.kind == MANIFEST:
                self.db.execute("DELETE FROM refs WHERE parent = ?", (row.id,))
                self.db.execute("DELETE FROM names WHERE manifest = ?", (row.id,))
                self.db.execute("DELETE FROM tags WHERE namespace = ? AND digest = ?",
                                (row.namespace, row.digest))
        for row in rows:
            self.db.execute("UPDATE objects SET size = NULL WHERE id = ? AND refcount > 0",
                            (row.id,))
            self.db.execute("DELETE FROM objects WHERE id = ? AND refcount = 0", (row.id,))

    def forget(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        with self.write():
            found = self.row(namespace, kind, digest)
            if found is not None and found.size is not None:
                self.drop([found])

    def remove(self, root: Root) -> list[Entry]:
        with self.write():
            found = self.row(root.entry.namespace, root.entry.kind, root.entry.digest)
            if found is None or found.size is None or found.refcount > 0 or \
                    found.tree_access > root.last_access:
                return []
            freed = self._frees(found, frozenset())
            self.drop(freed)
            return [row.entry() for row in freed]

    # ------------------------------------------------------------ roots

    def _children(self, manifest: int) -> list[Row]:
        return self.select(f"SELECT {', '.join('o.' + c for c in _COLUMNS.split(', '))} "
                          "FROM refs r JOIN objects o ON o.id = r.child WHERE r.parent = ?",
                          (manifest,))

    def _frees(self, root: Row, gone: AbstractSet[int]) -> list[Row]:
        """The root and what only it references (objects in `gone` count as removed)."""
        freed = {root.id: root}
        waiting: dict[int, Row] = {}
        parents: dict[int, list[int]] = {}
        stack = [root]
        while stack:
            node = stack.pop()
            if node.kind == MANIFEST:
                waiting.update((c.id, c) for c in self._children(node.id)
                               if c.id not in freed and c.id not in gone)
            for child in list(waiting.values()):
                # The one holder of a child with refcount 1 is the node that reached it.
                if child.refcount > 1:
                    if child.id not in parents:
                        parents[child.id] = [p for (p,) in self.db.execute(
                            "SELECT parent FROM refs WHERE child = ?", (child.id,))]
                    if not all(p in freed or p in gone for p in parents[child.id]):
                        continue
                freed[child.id] = child
                del waiting[child.id]
                stack.append(child)
        return [row for row in freed.values() if row.size is not None]

    def _root(self, row: Row, gone: AbstractSet[int]) -> tuple[Root, list[Row]]:
        freed = self._frees(row, gone)
        repositories = tuple(r for (r,) in self.db.execute(
            "SELECT repository FROM names WHERE manifest = ? ORDER BY repository", (row.id,)))
        tags = tuple((r, t) for r, t in self.db.execute(
            "SELECT DISTINCT repository, tag FROM tags WHERE namespace = ? AND digest = ? "
            "ORDER BY repository, tag", (row.namespace, row.digest)))
        return Root(row.entry(), row.tree_access, tuple(r.entry() for r in freed),
                    repositories, tags), freed

    def _root_rows(self, namespace: str | None, idle_before: float | None,
                   limit: int) -> Iterator[Row]:
        """Roots least recently used first, read a page at a time."""
        where = "refcount = 0 AND size IS NOT NULL"  # the partial indexes' condition
        args: list[object] = []
        if namespace is not None:
            where += " AND namespace = ?"
            args.append(namespace)
        if idle_before is not None:
            where += " AND tree_access < ?"
            args.append(idle_before)
        after: tuple[float, int] = (float("-inf"), 0)
        while limit > 0:
            page = self.select(f"SELECT {_COLUMNS} FROM objects WHERE {where} AND "
                              "(tree_access, id) > (?, ?) ORDER BY tree_access, id LIMIT ?",
                              (*args, *after, min(limit, _PAGE)))
            yield from page
            if len(page) < min(limit, _PAGE):
                return
            limit -= len(page)
            after = (page[-1].tree_access, page[-1].id)

    def roots(self, namespace: str | None, limit: int, idle_before: float | None) -> list[Root]:
        with self.snapshot():
            return [self._root(row, frozenset())[0]
                    for row in self._root_rows(namespace, idle_before, limit)]

    def root_of(self, namespace: str, kind: ObjectKind, digest: str) -> Root | None:
        with self.snapshot():
            found = self.row(namespace, kind, digest)
            if found is None or found.size is None or found.refcount > 0:
                return None
            return self._root(found, frozenset())[0]

    def preview(self, plan: Sequence[Target], keep: Callable[[Root], bool]
                ) -> list[tuple[Target, Root]]:
        with self.snapshot():
            used = self.usage().by_namespace
            gone: set[int] = set()
            out: list[tuple[Target, Root]] = []
            for target in plan:

                def over(target: Target = target) -> bool:
                    if target.max_bytes is None:
                        return True
                    if target.namespace is None:
                        return sum(used.values()) > target.max_bytes
                    return used.get(target.namespace, 0) > target.max_bytes

                rows = self._root_rows(target.namespace, target.idle_before, 1 << 62)
                while over() and (row := next(rows, None)) is not None:
                    if row.id in gone:
                        continue
                    root, freed = self._root(row, gone)
                    if keep(root):
                        continue
                    out.append((target, root))
                    gone.update(r.id for r in freed)
                    for r in freed:
                        used[r.namespace] -= r.size or 0
            return out

    # ------------------------------------------------------------ listings

    def usage(self) -> Usage:
        rows = self.db.execute("SELECT namespace, bytes, objects FROM totals "
                               "WHERE objects > 0 ORDER BY namespace").fetchall()
        return Usage(sum(r[1] for r in rows), sum(r[2] for r in rows),
                     {r[0]: r[1] for r in rows}, {r[0]: r[2] for r in rows})

    def loose_blobs(self, namespace: str | None) -> tuple[int, int]:
        where, args = ("AND namespace = ?", (namespace,)) if namespace else ("", ())
        count, size = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM objects WHERE refcount = 0 AND "
            f"size IS NOT NULL AND kind = 0 {where}", args).fetchone()
        return int(count), int(size)

    def referrers(self, namespace: str, kind: ObjectKind, digest: str) -> list[Entry]:
        return [r.entry() for r in self.select(
            f"SELECT {', '.join('o.' + c for c in _COLUMNS.split(', '))} FROM objects c "
            "JOIN refs r ON r.child = c.id JOIN objects o ON o.id = r.parent "
            "WHERE c.namespace = ? AND c.kind = ? AND c.digest = ?",
            (namespace, KIND_CODE[kind], digest))]

    def tagged(self, namespace: str, repository: str, tag: str) -> list[str]:
        return [d for (d,) in self.db.execute(
            "SELECT DISTINCT digest FROM tags WHERE namespace = ? AND repository = ? AND "
            "tag = ? ORDER BY view", (namespace, repository, tag))]

    def images(self, namespace: str | None) -> list[CachedImage]:
        """Every root manifest with its closure's size and what only it holds: an object
        reachable from exactly one root is what removing that root frees."""
        where, args = ("AND namespace = ?", (namespace,)) if namespace else ("", ())
        with self.snapshot():
            sizes = {root: (total, unique) for root, total, unique in self.db.execute(f"""
                WITH RECURSIVE reach(root, id) AS (
                    SELECT id, id FROM objects WHERE refcount = 0 AND size IS NOT NULL
                        AND kind = 1 {where}
                    UNION SELECT reach.root, r.child FROM reach JOIN refs r
                        ON r.parent = reach.id),
                holders(id, n) AS (SELECT id, count(*) FROM reach GROUP BY id)
                SELECT reach.root, sum(o.size), coalesce(sum(CASE WHEN h.n = 1 THEN o.size END), 0)
                FROM reach JOIN objects o ON o.id = reach.id JOIN holders h ON h.id = reach.id
                WHERE o.size IS NOT NULL GROUP BY reach.root""", args)}
            names: dict[int, list[str]] = {}
            for manifest, repository in self.db.execute(
                    "SELECT manifest, repository FROM names ORDER BY repository"):
                names.setdefault(manifest, []).append(repository)
            tags: dict[tuple[str, str], list[tuple[str, str]]] = {}
            for ns, digest, repository, tag in self.db.execute(
                    "SELECT DISTINCT namespace, digest, repository, tag FROM tags "
                    "ORDER BY repository, tag"):
                tags.setdefault((ns, digest), []).append((repository, tag))
            rows = self.select(f"SELECT {_COLUMNS} FROM objects WHERE refcount = 0 AND size "
                              f"IS NOT NULL AND kind = 1 {where} ORDER BY tree_access DESC",
                              args)
        return [CachedImage(row.entry(), row.tree_access, *sizes.get(row.id, (0, 0)),
                            tuple(names.get(row.id, ())),
                            tuple(tags.get((row.namespace, row.digest), ())))
                for row in rows]

    def repositories(self, namespace: str | None, limit: int) -> list[RepositoryUsage]:
        where, args = ("AND o.namespace = ?", (namespace,)) if namespace else ("", ())
        rows = self.db.execute(f"""
            WITH RECURSIVE reach(namespace, repository, id) AS (
                SELECT o.namespace, n.repository, o.id FROM names n
                    JOIN objects o ON o.id = n.manifest WHERE o.size IS NOT NULL {where}
                UNION SELECT reach.namespace, reach.repository, r.child FROM reach
                    JOIN refs r ON r.parent = reach.id)
            SELECT reach.namespace, reach.repository, sum(o.size), count(*),
                   sum(o.kind = 1)
            FROM reach JOIN objects o ON o.id = reach.id WHERE o.size IS NOT NULL
            GROUP BY reach.namespace, reach.repository ORDER BY 3 DESC, 2 LIMIT ?""",
                               (*args, limit)).fetchall()
        return [RepositoryUsage(*r) for r in rows]
