"""The catalogue of what the store holds, for the size cap: every manifest and blob with
its size and last access, which objects each manifest references, which repositories
and tags name a manifest. Durable (sqlite now, Redis later); the store stays the truth.

The protocol only: what eviction and the `cache` command ask. Implementations batch
access times (never a write per request) and run their I/O off the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..errors import RegistryError
from ..reference import parse_digest

ObjectKind = Literal["blob", "manifest"]


@dataclass(frozen=True, slots=True)
class Entry:
    namespace: str
    kind: ObjectKind
    digest: str
    size: int
    last_access: float


@dataclass(frozen=True, slots=True)
class Root:
    """Something eviction may remove: a manifest no cached manifest references (an image),
    or a blob no cached manifest references. `frees` is the root itself plus every object
    only it references (shared blobs are counted once, by the last image that holds them).
    `last_access` is the latest access of any manifest in that closure (or of the blob)."""

    entry: Entry
    last_access: float
    frees: tuple[Entry, ...]
    repositories: tuple[str, ...] = ()  # that named the root manifest (pins match these)
    tags: tuple[tuple[str, str], ...] = ()  # (repository, tag) pointing at it

    @property
    def size(self) -> int:
        return sum(e.size for e in self.frees)


@dataclass(frozen=True, slots=True)
class Usage:
    total: int  # bytes of every cached object, each counted once
    objects: int
    by_namespace: dict[str, int] = field(default_factory=dict)
    objects_by_namespace: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CachedImage:
    """An image as `cache ls` shows it: a root manifest and what its closure holds."""

    entry: Entry
    last_access: float  # as Root.last_access
    size: int  # every cached object it references, shared ones included
    unique: int  # what removing it frees (Root.size)
    repositories: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RepositoryUsage:
    namespace: str
    repository: str
    size: int  # cached objects its manifests reach; a blob shared with others counts here too
    objects: int
    manifests: int


@dataclass(frozen=True, slots=True)
class Target:
    """One step of an eviction plan: remove roots, least recently used first, until the
    usage of `namespace` (every namespace if None) is at most `max_bytes`; with
    `idle_before`, only roots idle since before then (and all of them if max_bytes is None)."""

    reason: str  # "idle", "size", "quota", "free space": the metric label
    namespace: str | None = None
    max_bytes: int | None = None
    idle_before: float | None = None


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What a pass over the store changed in the catalogue."""

    added: int = 0  # files the catalogue did not know
    dropped: int = 0  # entries whose file was gone
    resized: int = 0  # entries whose size differed from the file's


class ContentsError(Exception):
    """The catalogue could not answer (its file is locked or broken); the store is fine."""


class Contents(Protocol):
    async def open(self) -> None:
        """Ready to use: created, migrated, or rebuilt from the store if missing or corrupt;
        after an unclean stop, reconciled with the store (may finish in the background)."""

    async def settled(self) -> Reconciled:
        """Wait for a rebuild or reconciliation started by `open` to finish; what it did."""

    async def close(self) -> None:
        """Flush batched access times and mark a clean stop."""

    async def add_blob(self, namespace: str, digest: str, size: int) -> None: ...

    async def add_manifest(self, namespace: str, digest: str, size: int, repository: str,
                           children: Sequence[tuple[ObjectKind, str]]) -> None:
        """A verified manifest kept; `children` are what it references (config and layers
        as blobs; an index's manifests), cached yet or not (see `references`). `size` is
        what the store holds for it (the file: media type line and body)."""

    async def add_tag(self, namespace: str, repository: str, tag: str, digest: str,
                      view: str = "_tags") -> None:
        """`view` as in policy.View: a narrow answer does not replace the wide one."""

    def touch(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        """Served now. Synchronous and cheap: recorded in memory, written in batches."""

    async def usage(self) -> Usage: ...

    async def roots(self, *, namespace: str | None = None, limit: int = 100,
                    idle_before: float | None = None) -> list[Root]:
        """Eviction candidates, least recently used first (only those idle since before
        `idle_before`, if given). Protections are the caller's (readers, leases, pins)."""

    async def remove(self, root: Root) -> list[Entry]:
        """Take a root out of the catalogue, atomically; the entries returned (recomputed
        now, as references may have changed) are the objects to delete from the store.
        Nothing is removed (and [] returned) if it is no longer a root, or if it was read
        after `root` was listed."""

    async def forget(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        """An object found missing from the store."""


class Browsable(Contents, Protocol):
    """What the operator's `cache` command asks besides: listings and a dry run."""

    async def flush(self) -> None:
        """Write the batched access times now."""

    async def reconcile(self) -> Reconciled:
        """Compare the catalogue with the store now and correct it."""

    async def find(self, namespace: str, kind: ObjectKind, digest: str) -> Entry | None: ...

    async def referrers(self, namespace: str, kind: ObjectKind, digest: str) -> list[Entry]:
        """The cached manifests that reference this object."""

    async def root_of(self, namespace: str, kind: ObjectKind, digest: str) -> Root | None:
        """This object as a root, or None if it is not cached or is referenced."""

    async def tagged(self, namespace: str, repository: str, tag: str) -> list[str]:
        """The digests a tag names (in any view)."""

    async def images(self, *, namespace: str | None = None) -> list[CachedImage]:
        """Every root manifest, most recently used first."""

    async def loose_blobs(self, *, namespace: str | None = None) -> tuple[int, int]:
        """(count, bytes) of the cached blobs no cached manifest references."""

    async def repositories(self, *, namespace: str | None = None,
                           limit: int = 20) -> list[RepositoryUsage]:
        """The repositories that use the most, largest first."""

    async def preview(self, plan: Sequence[Target], keep: Callable[[Root], bool]
                      ) -> list[tuple[Target, Root]]:
        """What eviction would remove, in order, following `plan`: each root's `frees` as
        if the ones before it were removed (nothing is). Roots `keep` says are kept are
        skipped; `keep` runs on the implementation's I/O thread, so it must be pure."""


def references(body: bytes) -> tuple[tuple[ObjectKind, str], ...]:
    """What a manifest references, from its JSON: an index's manifests; an image's config
    and layers (and an artifact's blobs). Not `subject`: a referrer does not hold the image
    it refers to. Entries whose digest is not valid are left out."""
    try:
        document = json.loads(body)
    except ValueError:
        return ()
    if not isinstance(document, dict):
        return ()
    found: list[tuple[ObjectKind, str]] = []
    groups: tuple[tuple[str, ObjectKind], ...] = (
        ("manifests", "manifest"), ("config", "blob"), ("layers", "blob"), ("blobs", "blob"))
    for key, kind in groups:
        value = document.get(key)
        for descriptor in value if isinstance(value, list) else [value]:
            digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
            if isinstance(digest, str) and _valid(digest) and (kind, digest) not in found:
                found.append((kind, digest))
    return tuple(found)


def _valid(digest: str) -> bool:
    try:
        parse_digest(digest)
    except RegistryError:
        return False
    return True
