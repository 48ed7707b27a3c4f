"""The catalogue of one process, in memory: for tests and for a data directory that
need not survive a restart. Same semantics as the sqlite catalogue (the conformance
suite holds both to them); lost at exit, rebuilt by nobody.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from .contents import Entry, ObjectKind, Root, Usage

Key = tuple[str, ObjectKind, str]  # namespace, kind, digest


class MemoryContents:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._objects: dict[Key, Entry] = {}
        self._children: dict[Key, set[Key]] = defaultdict(set)
        self._parents: dict[Key, set[Key]] = defaultdict(set)
        self._repositories: dict[Key, set[str]] = defaultdict(set)
        self._tags: dict[tuple[str, str, str], str] = {}  # (ns, repository, tag) -> digest

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _add(self, key: Key, size: int) -> None:
        old = self._objects.get(key)
        self._objects[key] = Entry(*key, size, self._clock() if old is None
                                   else max(old.last_access, self._clock()))

    async def add_blob(self, namespace: str, digest: str, size: int) -> None:
        self._add((namespace, "blob", digest), size)

    async def add_manifest(self, namespace: str, digest: str, size: int, repository: str,
                           children: Sequence[tuple[ObjectKind, str]]) -> None:
        key: Key = (namespace, "manifest", digest)
        self._add(key, size)
        self._repositories[key].add(repository)
        for kind, child in children:
            self._children[key].add((namespace, kind, child))
            self._parents[(namespace, kind, child)].add(key)

    async def add_tag(self, namespace: str, repository: str, tag: str, digest: str) -> None:
        self._tags[(namespace, repository, tag)] = digest

    def touch(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        entry = self._objects.get((namespace, kind, digest))
        if entry is not None:
            self._objects[(namespace, kind, digest)] = Entry(
                entry.namespace, entry.kind, entry.digest, entry.size, self._clock())

    async def usage(self) -> Usage:
        by_namespace: dict[str, int] = defaultdict(int)
        for entry in self._objects.values():
            by_namespace[entry.namespace] += entry.size
        return Usage(sum(by_namespace.values()), len(self._objects), dict(by_namespace))

    def _cached_parents(self, key: Key) -> set[Key]:
        return {p for p in self._parents.get(key, ()) if p in self._objects}

    def _closure(self, root: Key) -> list[Key]:
        """The root and every cached object that only it (through its closure) holds."""
        held, inside, changed = [root], {root}, True
        while changed:  # to a fixed point: a child may hang on two parents inside
            changed = False
            for node in list(held):
                for child in self._children.get(node, ()):
                    if child not in inside and child in self._objects and \
                            self._cached_parents(child) <= inside:
                        inside.add(child)
                        held.append(child)
                        changed = True
        return held

    def _root(self, key: Key) -> Root:
        frees = tuple(self._objects[k] for k in self._closure(key))
        last = max(e.last_access for e in frees if e.kind == "manifest" or e is frees[0])
        digest = key[2]
        tags = tuple((repo, tag) for (ns, repo, tag), d in self._tags.items()
                     if ns == key[0] and d == digest)
        return Root(self._objects[key], last, frees,
                    tuple(sorted(self._repositories.get(key, ()))), tags)

    async def roots(self, *, namespace: str | None = None, limit: int = 100,
                    idle_before: float | None = None) -> list[Root]:
        found = [self._root(k) for k in self._objects
                 if (namespace is None or k[0] == namespace) and not self._cached_parents(k)]
        if idle_before is not None:
            found = [r for r in found if r.last_access < idle_before]
        found.sort(key=lambda r: (r.last_access, r.entry.digest))
        return found[:limit]

    async def remove(self, root: Root) -> list[Entry]:
        key: Key = (root.entry.namespace, root.entry.kind, root.entry.digest)
        if key not in self._objects or self._cached_parents(key):
            return []  # gone already, or held again by a manifest cached since
        removed = [self._objects.pop(k) for k in self._closure(key)]
        for entry in removed:
            self._forget_links((entry.namespace, entry.kind, entry.digest))
        return removed

    def _forget_links(self, key: Key) -> None:
        for child in self._children.pop(key, set()):
            self._parents[child].discard(key)
        self._repositories.pop(key, None)
        if key[1] == "manifest":
            for tag_key in [t for t, d in self._tags.items() if t[0] == key[0] and d == key[2]]:
                del self._tags[tag_key]

    async def forget(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        key: Key = (namespace, kind, digest)
        if self._objects.pop(key, None) is not None:
            self._forget_links(key)
