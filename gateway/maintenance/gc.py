"""`cache gc --dry-run`: what eviction would remove next to bring the cache within its
caps, in order. Nothing is removed: the running gateway evicts by itself.

The policy: idle roots first (`max_idle`), then per-route quotas, then `max_size`, then
`min_free`; within each, roots least recently used first, never a pinned one nor one
read within `lease`. `plan` and `Keeper` are pure, so eviction can follow the same rules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..cache.contents import Root, Target, Usage
from ..config import Config
from .listing import Filesystem
from .report import Names, age, duration_text, human, table, write_json
from .session import Session


def plan(config: Config, usage: Usage, filesystem: Filesystem, now: float) -> list[Target]:
    limits = config.cache
    steps = []
    if limits.max_idle is not None:
        steps.append(Target("idle", idle_before=now - limits.max_idle))
    steps += [Target("quota", namespace=route.namespace, max_bytes=route.cache.max_size)
              for route in config.routes if route.cache.max_size is not None]
    if limits.max_size is not None:
        steps.append(Target("size", max_bytes=limits.max_size))
    keep_free = limits.min_free.of(filesystem.size)
    if filesystem.free < keep_free:
        steps.append(Target("free space",
                            max_bytes=max(0, usage.total - (keep_free - filesystem.free))))
    return steps


@dataclass
class Keeper:
    """`keep` for Contents.preview: pinned roots and roots read within the lease stay.
    Remembers what it kept, by digest."""

    config: Config
    now: float
    pinned: dict[str, Root] = field(default_factory=dict)
    leased: dict[str, Root] = field(default_factory=dict)

    def is_pinned(self, root: Root) -> bool:
        route = Names(self.config).route(root.entry.namespace)
        digest = root.entry.digest
        for pin in self.config.pins:
            if pin.route == route and pin.digest is not None and pin.digest == digest:
                return True  # a digest pin holds even where the repository is unknown
            if any(pin.matches(route, repository, [t for r, t in root.tags if r == repository],
                               digest) for repository in root.repositories):
                return True
        return False

    def __call__(self, root: Root) -> bool:
        if self.is_pinned(root):
            self.pinned[root.entry.digest] = root
            return True
        if root.last_access >= self.now - self.config.cache.lease:
            self.leased[root.entry.digest] = root
            return True
        return False


def _caps(config: Config, filesystem: Filesystem) -> str:
    limits = config.cache
    parts = [f"max_size {human(limits.max_size) if limits.max_size else 'none'}",
             f"min_free {limits.min_free} ({human(limits.min_free.of(filesystem.size))}; "
             f"{human(filesystem.free)} free)",
             f"max_idle {duration_text(limits.max_idle) if limits.max_idle else 'none'}"]
    quotas = [f"{r.name} {human(r.cache.max_size)}" for r in config.routes if r.cache.max_size]
    if quotas:
        parts.append("quotas " + ", ".join(quotas))
    return ", ".join(parts)


async def gc(session: Session, *, dry_run: bool, as_json: bool) -> int:
    if not dry_run:
        session.err.write("registry-gateway cache gc: only --dry-run is offered: the running "
                          "gateway evicts by itself (a removal here could take blobs a pull "
                          "is about to read). Use `cache rm IMAGE` to remove images.\n")
        return 2
    config, now = session.config, time.time()
    usage = await session.contents.usage()
    filesystem = Filesystem.of(session.data_dir)
    keeper = Keeper(config, now)
    removed = await session.contents.preview(plan(config, usage, filesystem, now), keeper)
    freed = sum(root.size for _, root in removed)
    names = session.names

    def name(root: Root) -> str:
        return names.reference(root.entry, root.repositories, root.tags)

    if as_json:
        def item(root: Root, reason: str | None = None) -> dict[str, Any]:
            return {"reason": reason, "object": name(root), "digest": root.entry.digest,
                    "kind": root.entry.kind, "bytes": root.size,
                    "objects": len(root.frees), "last_access": root.last_access}

        write_json(session.out, {
            "bytes": usage.total, "would_free": freed, "bytes_after": usage.total - freed,
            "remove": [item(root, target.reason) for target, root in removed],
            "kept_pinned": [item(r) for r in keeper.pinned.values()],
            "kept_leased": [item(r) for r in keeper.leased.values()]})
        return 0
    out = session.out
    out.write(f"caps: {_caps(config, filesystem)}\n")
    if not removed:
        out.write(f"usage {human(usage.total)}: within the caps, eviction would remove "
                  "nothing\n")
    else:
        out.write(f"usage {human(usage.total)}: eviction would remove {len(removed)} "
                  f"(least recently used first), freeing {human(freed)} -> "
                  f"{human(usage.total - freed)}\n\n")
        table(out, ["REASON", "FREES", "LAST ACCESS", "OBJECT"], [
            [target.reason, human(root.size), age(root.last_access, now), name(root)]
            for target, root in removed], right=(1,))
    for what, kept in (("pinned", keeper.pinned), ("read within the lease "
                                                   f"({duration_text(config.cache.lease)})",
                                                   keeper.leased)):
        if kept:
            out.write(f"kept, {what}: {len(kept)} "
                      f"({human(sum(r.size for r in kept.values()))})\n")
            for root in kept.values():
                out.write(f"  {name(root)}\n")
    out.write("(the running gateway also keeps what is being read or fetched)\n")
    return 0
