"""`cache rm IMAGE...`: take images out of the cache, with the blobs only they hold.

IMAGE is written as in `pins:` (a reference, `@digest`, or a glob), parsed by the same
code. The catalogue decides what goes (one transaction); the files follow.
"""

from __future__ import annotations

from typing import Any

from ..cache.contents import ObjectKind, Root
from ..config import Pin
from ..config.document import Document
from ..config.pins import parse_pin
from ..errors import ConfigError
from .report import human, write_json
from .session import Session

_KINDS: tuple[ObjectKind, ...] = ("manifest", "blob")


async def _by_digest(session: Session, namespace: str, digest: str) -> tuple[list[Root], str]:
    contents = session.contents
    for kind in _KINDS:
        root = await contents.root_of(namespace, kind, digest)
        if root is not None:
            return [root], ""
    for kind in _KINDS:
        if await contents.find(namespace, kind, digest) is not None:
            holders = await contents.referrers(namespace, kind, digest)
            held_by = ", ".join(session.names.route(h.namespace) + "@" + h.digest
                                for h in holders[:3])
            return [], (f"it is part of {held_by}{' and more' if len(holders) > 3 else ''}: "
                        "remove that instead")
    return [], "not cached"


async def _matching(session: Session, namespace: str, pin: Pin) -> tuple[list[Root], str]:
    if pin.digest is not None:
        return await _by_digest(session, namespace, pin.digest)
    roots = []
    for image in await session.contents.images(namespace=namespace):
        if any(pin.matches(pin.route, repository,
                           [t for r, t in image.tags if r == repository], image.entry.digest)
               for repository in image.repositories):
            root = await session.contents.root_of(namespace, "manifest", image.entry.digest)
            if root is not None:
                roots.append(root)
    return roots, "" if roots else "no cached image matches"


async def rm(session: Session, patterns: list[str], *, dry_run: bool, as_json: bool) -> int:
    status = 0
    done: list[dict[str, Any]] = []
    for text in patterns:
        try:
            pin = parse_pin(text, Document("command line", None, {}).at("IMAGE"),
                            session.config.routes)
        except ConfigError as exc:
            session.err.write(f"registry-gateway cache rm: {exc}\n")
            status = 1
            continue
        namespace = session.config.route(pin.route).namespace
        roots, problem = await _matching(session, namespace, pin)
        if problem:
            session.err.write(f"registry-gateway cache rm: {text}: {problem}\n")
            status = 1
        for root in roots:
            name = session.names.reference(root.entry, root.repositories, root.tags)
            entries = list(root.frees) if dry_run else await session.contents.remove(root)
            if not entries:
                session.err.write(f"registry-gateway cache rm: {name} was read or referenced "
                                  "again while being removed: kept\n")
                status = 1
                continue
            if not dry_run:
                await session.delete(entries)
            size = sum(e.size for e in entries)
            done.append({"image": name, "digest": root.entry.digest, "objects": len(entries),
                         "bytes": size, "removed": [e.digest for e in entries]})
            if not as_json:
                session.out.write(f"{'would remove' if dry_run else 'removed'} {name}: "
                                  f"{len(entries)} objects, {human(size)}\n")
    if as_json:
        write_json(session.out, {"dry_run": dry_run, "images": done})
    return status
