"""`cache du` (usage by route and top repositories, against the caps) and `cache ls`
(images with size and last access). Read only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..cache.contents import CachedImage
from ..cache.contents_schema import FILE
from .report import age, human, table, timestamp, write_json
from .session import Session


@dataclass(frozen=True)
class Filesystem:
    size: int
    free: int  # for an unprivileged writer, as the gateway is

    @classmethod
    def of(cls, path: os.PathLike[str] | str) -> Filesystem:
        found = os.statvfs(path)
        return cls(found.f_blocks * found.f_frsize, found.f_bavail * found.f_frsize)


@dataclass(frozen=True)
class RouteUsage:
    route: str
    namespace: str
    in_routes_yaml: bool
    bytes: int
    objects: int
    max_size: int | None

    def cells(self) -> list[str]:
        quota = human(self.max_size) + _percent(self.bytes, self.max_size) if self.max_size \
            else "-"
        return [self.route + ("" if self.in_routes_yaml else " (not in routes.yaml)"),
                human(self.bytes), str(self.objects), quota]


def _index_bytes(session: Session) -> int:
    return sum(p.stat().st_size for p in session.data_dir.glob(FILE + "*") if p.is_file())


def _percent(part: int, whole: int | None) -> str:
    return f" ({100 * part / whole:.0f}%)" if whole else ""


async def du(session: Session, *, top: int, as_json: bool) -> int:
    config, names = session.config, session.names
    usage = await session.contents.usage()
    filesystem = Filesystem.of(session.data_dir)
    keep_free = config.cache.min_free.of(filesystem.size)
    namespaces = sorted({r.namespace for r in config.routes} | set(usage.by_namespace))
    quotas = {route.namespace: route.cache.max_size for route in config.routes}
    routes = [RouteUsage(names.route(ns), ns, names.known(ns), usage.by_namespace.get(ns, 0),
                         usage.objects_by_namespace.get(ns, 0), quotas.get(ns))
              for ns in namespaces]
    repositories = await session.contents.repositories(limit=top)
    if as_json:
        write_json(session.out, {
            "data_dir": str(session.data_dir), "bytes": usage.total, "objects": usage.objects,
            "max_size": config.cache.max_size, "index_bytes": _index_bytes(session),
            "filesystem": {"size": filesystem.size, "free": filesystem.free,
                           "min_free": keep_free},
            "routes": [vars(r) for r in routes],
            "repositories": [{"route": names.route(r.namespace), "namespace": r.namespace,
                              "repository": r.repository, "bytes": r.size,
                              "objects": r.objects, "manifests": r.manifests}
                             for r in repositories]})
        return 0
    out = session.out
    cap = human(config.cache.max_size) if config.cache.max_size else "none"
    out.write(f"{session.data_dir}: {human(usage.total)} in {usage.objects} objects, "
              f"max_size {cap}{_percent(usage.total, config.cache.max_size)}; "
              f"index {human(_index_bytes(session))}\n")
    verdict = "ok" if filesystem.free >= keep_free else "below: eviction frees space"
    out.write(f"filesystem: {human(filesystem.free)} free of {human(filesystem.size)}; "
              f"min_free {config.cache.min_free} = {human(keep_free)} ({verdict})\n\n")
    table(out, ["ROUTE", "SIZE", "OBJECTS", "QUOTA"], [r.cells() for r in routes],
          right=(1, 2))
    if repositories:
        out.write(f"\ntop {len(repositories)} repositories (a layer shared by several "
                  "counts in each):\n")
        table(out, ["SIZE", "OBJECTS", "MANIFESTS", "REPOSITORY"], [
            [human(r.size), str(r.objects), str(r.manifests),
             f"{names.route(r.namespace)}/{r.repository}"] for r in repositories],
              right=(0, 1, 2))
    return 0


def _image_json(session: Session, image: CachedImage) -> dict[str, Any]:
    names = session.names
    return {"route": names.route(image.entry.namespace), "namespace": image.entry.namespace,
            "digest": image.entry.digest,
            "references": names.references(image.entry, image.repositories, image.tags),
            "repositories": list(image.repositories),
            "tags": [{"repository": r, "tag": t} for r, t in image.tags],
            "bytes": image.size, "unique_bytes": image.unique,
            "last_access": image.last_access, "last_access_utc": timestamp(image.last_access)}


async def ls(session: Session, *, route: str | None, as_json: bool) -> int:
    namespace = None
    if route is not None:
        known = {r.name: r.namespace for r in session.config.routes}
        if route not in known:
            session.err.write(f"registry-gateway cache ls: no route {route!r} in "
                              f"{session.config.source} ({', '.join(known)})\n")
            return 1
        namespace = known[route]
    images = await session.contents.images(namespace=namespace)
    loose, loose_bytes = await session.contents.loose_blobs(namespace=namespace)
    if as_json:
        write_json(session.out, {"images": [_image_json(session, i) for i in images],
                                 "unreferenced_blobs": {"count": loose, "bytes": loose_bytes}})
        return 0
    now = time.time()
    table(session.out, ["SIZE", "UNIQUE", "LAST ACCESS", "IMAGE"], [
        [human(i.size), human(i.unique), age(i.last_access, now),
         session.names.reference(i.entry, i.repositories, i.tags)] for i in images],
          right=(0, 1))
    session.out.write(f"{len(images)} images; {loose} blobs in no cached image "
                      f"({human(loose_bytes)}). UNIQUE: what removing the image frees.\n")
    return 0
