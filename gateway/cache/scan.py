"""Walking the filesystem store's tree (the layout of store.py keys) for what it holds:
committed blobs and manifests, bucket by bucket, and tag files. Reads only, never writes
or deletes; blocking, so call it from a worker thread.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .contents import ObjectKind
from .policy import NARROW, WIDE, TagEntry

KIND_DIRS: dict[ObjectKind, str] = {"blob": "blobs", "manifest": "manifests"}
VIEWS = (WIDE, NARROW)
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_PREFIX = re.compile(r"[0-9a-f]{2}")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Bucket:
    """One `<namespace>/<kind>s/<algorithm>/<xx>/` directory."""

    namespace: str
    kind: ObjectKind
    algorithm: str
    prefix: str  # two hex digits

    @property
    def digest_prefix(self) -> str:
        return f"{self.algorithm}:{self.prefix}"


@dataclass(frozen=True, slots=True)
class StoredObject:
    namespace: str
    kind: ObjectKind
    digest: str
    size: int  # of the file
    mtime: float
    path: str


@dataclass(frozen=True, slots=True)
class StoredTag:
    namespace: str
    repository: str
    view: str
    tag: str
    path: str


def object_path(data_dir: Path, namespace: str, kind: ObjectKind, digest: str) -> Path:
    algorithm, _, hex_digest = digest.partition(":")
    return data_dir / namespace / KIND_DIRS[kind] / algorithm / hex_digest[:2] / hex_digest


def namespaces(data_dir: Path) -> list[str]:
    """The namespaces with cached content: top-level directories, not the dot ones (the
    spool, the index's own files)."""
    try:
        entries = list(os.scandir(data_dir))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False)
                  and not e.name.startswith(".")
                  and any(os.path.isdir(os.path.join(e.path, d))
                          for d in (*KIND_DIRS.values(), "tags")))


def _subdirs(path: str) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def buckets(data_dir: Path, namespace: str, kind: ObjectKind) -> list[Bucket]:
    base = os.path.join(data_dir, namespace, KIND_DIRS[kind])
    found = []
    for algorithm in _subdirs(base):
        if algorithm.name not in _HEX_LENGTH:
            continue
        found += [Bucket(namespace, kind, algorithm.name, prefix.name)
                  for prefix in _subdirs(algorithm.path) if _PREFIX.fullmatch(prefix.name)]
    return sorted(found, key=lambda b: (b.algorithm, b.prefix))


def bucket_path(data_dir: Path, bucket: Bucket) -> str:
    return os.path.join(data_dir, bucket.namespace, KIND_DIRS[bucket.kind], bucket.algorithm,
                        bucket.prefix)


def list_bucket(data_dir: Path, bucket: Bucket) -> list[StoredObject]:
    """The committed objects of one bucket; files whose names are no digest are ignored."""
    length = _HEX_LENGTH[bucket.algorithm]
    found = []
    try:
        entries = list(os.scandir(bucket_path(data_dir, bucket)))
    except FileNotFoundError:
        return []
    for entry in entries:
        name = entry.name
        if len(name) != length or not name.startswith(bucket.prefix) or \
                not _HEX.fullmatch(name):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed while we looked
            continue
        if entry.is_file(follow_symlinks=False):
            found.append(StoredObject(bucket.namespace, bucket.kind,
                                      f"{bucket.algorithm}:{name}", stat.st_size,
                                      stat.st_mtime, entry.path))
    return found


def read_manifest(path: str) -> tuple[str, bytes] | None:
    """(media type, body) of a stored manifest: its media type line, then the bytes."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        return None
    media_type, _, body = raw.partition(b"\n")
    return media_type.decode(errors="replace"), body


def tag_files(data_dir: Path, namespace: str) -> Iterator[StoredTag]:
    """Every `<namespace>/tags/<repository>/<view>/<tag>` file. Repository components never
    start with `_`, so a `_tags` or `_narrow` directory is always a view."""
    root = os.path.join(data_dir, namespace, "tags")
    stack = [("", root)]
    while stack:
        repository, path = stack.pop()
        for entry in _subdirs(path):
            if entry.name in VIEWS and repository:
                try:
                    names = [e for e in os.scandir(entry.path) if e.is_file()]
                except FileNotFoundError:
                    continue
                yield from (StoredTag(namespace, repository, entry.name, e.name, e.path)
                            for e in names)
            elif not entry.name.startswith("_"):
                stack.append((f"{repository}/{entry.name}" if repository else entry.name,
                              entry.path))


def read_tag(path: str) -> TagEntry | None:
    try:
        with open(path, "rb") as file:
            return TagEntry.decode(file.read())
    except FileNotFoundError:
        return None
