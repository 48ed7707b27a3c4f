"""The catalogue of what the store holds, for the size cap: every manifest and blob with
its size and last access, which objects each manifest references, which repositories
and tags name a manifest. Durable (sqlite now, Redis later); the store stays the truth.

The protocol only: what eviction and the `cache` command ask. Implementations batch
access times (never a write per request) and run their I/O off the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

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


class Contents(Protocol):
    async def open(self) -> None:
        """Ready to use: created, migrated, or rebuilt from the store if missing or corrupt;
        after an unclean stop, reconciled with the store (may finish in the background)."""

    async def close(self) -> None:
        """Flush batched access times and mark a clean stop."""

    async def add_blob(self, namespace: str, digest: str, size: int) -> None: ...

    async def add_manifest(self, namespace: str, digest: str, size: int, repository: str,
                           children: Sequence[tuple[ObjectKind, str]]) -> None:
        """A verified manifest kept; `children` are what it references (config and layers
        as blobs; an index's manifests), cached yet or not."""

    async def add_tag(self, namespace: str, repository: str, tag: str, digest: str) -> None: ...

    def touch(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        """Served now. Synchronous and cheap: recorded in memory, written in batches."""

    async def usage(self) -> Usage: ...

    async def roots(self, *, namespace: str | None = None, limit: int = 100,
                    idle_before: float | None = None) -> list[Root]:
        """Eviction candidates, least recently used first (only those idle since before
        `idle_before`, if given). Protections are the caller's (readers, leases, pins)."""

    async def remove(self, root: Root) -> list[Entry]:
        """Take a root out of the catalogue, atomically; the entries returned (recomputed
        now, as references may have changed) are the objects to delete from the store."""

    async def forget(self, namespace: str, kind: ObjectKind, digest: str) -> None:
        """An object found missing from the store."""
