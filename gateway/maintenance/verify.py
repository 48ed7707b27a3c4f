"""`cache verify`: re-hash every blob and manifest in the store; a file whose bytes do not
hash to its name (corrupt, truncated) is removed through the store and dropped from the
catalogue, so the next pull fetches it again. Tag files that do not parse go too. Then the
catalogue is reconciled with what remains.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import scan
from ..cache.contents import ObjectKind, Reconciled
from ..cache.store import blob_key, manifest_key
from ..reference import parse_digest
from .report import human, write_json
from .session import Session

CHUNK = 1 << 20


@dataclass(frozen=True)
class Damaged:
    namespace: str
    kind: str  # blob, manifest, tag
    name: str  # the digest, or repository:tag
    path: str
    reason: str


def _problem(path: str, kind: ObjectKind, digest: str) -> str | None:
    """Why the file is not the object its name says, or None. A manifest file is its
    media type line, then the manifest's bytes."""
    algorithm = digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    try:
        with open(path, "rb") as file:
            if kind == "manifest":
                head = file.readline()
                if not head.endswith(b"\n"):
                    return "no media type line"
            while data := file.read(CHUNK):
                hasher.update(data)
    except FileNotFoundError:
        return None  # removed meanwhile (eviction): nothing to judge
    found = f"{algorithm}:{hasher.hexdigest()}"
    return None if found == digest else f"bytes hash to {found}"


def _progress(session: Session, checked: list[int], last: list[float]) -> None:
    """A line on a terminal every few seconds: a large cache takes a while to re-hash."""
    now = time.monotonic()
    if session.err.isatty() and now - last[0] > 5:
        last[0] = now
        session.err.write(f"\rverified {checked[0]} objects ({human(checked[1])})...")
        session.err.flush()


async def _stored(data_dir: Path) -> AsyncIterator[scan.StoredObject]:
    """Every blob and manifest file, a bucket listed at a time."""
    for namespace in await asyncio.to_thread(scan.namespaces, data_dir):
        for kind in scan.KIND_DIRS:
            for bucket in await asyncio.to_thread(scan.buckets, data_dir, namespace, kind):
                for stored in await asyncio.to_thread(scan.list_bucket, data_dir, bucket):
                    yield stored


async def _check_objects(session: Session, checked: list[int]) -> list[Damaged]:
    damaged = []
    last = [time.monotonic()]
    async for stored in _stored(session.data_dir):
        checked[0] += 1
        checked[1] += stored.size
        _progress(session, checked, last)
        problem = await asyncio.to_thread(_problem, stored.path, stored.kind, stored.digest)
        if problem is None:
            continue
        key = (blob_key if stored.kind == "blob" else manifest_key)(
            stored.namespace, parse_digest(stored.digest))
        await session.store.delete(key)
        await session.contents.forget(stored.namespace, stored.kind, stored.digest)
        damaged.append(Damaged(stored.namespace, stored.kind, stored.digest, stored.path,
                               problem))
    if session.err.isatty():
        session.err.write("\r\033[K")  # the progress line goes
    return damaged


def _bad_tags(session: Session) -> list[Damaged]:
    found = []
    for namespace in scan.namespaces(session.data_dir):
        for stored in scan.tag_files(session.data_dir, namespace):
            if os.path.exists(stored.path) and scan.read_tag(stored.path) is None:
                os.unlink(stored.path)
                found.append(Damaged(namespace, "tag", f"{stored.repository}:{stored.tag}",
                                     stored.path, "not a tag entry"))
    return found


async def verify(session: Session, *, as_json: bool) -> int:
    checked = [0, 0]  # objects, bytes
    damaged = await _check_objects(session, checked)
    damaged += await asyncio.to_thread(_bad_tags, session)
    now = await session.contents.reconcile()
    rebuilt = session.contents.rebuilt
    # What opening it corrected (after an unclean stop) counts too; a rebuild's does not.
    before = session.settled if rebuilt is None else Reconciled()
    reconciled = Reconciled(before.added + now.added, before.dropped + now.dropped,
                            before.resized + now.resized)
    if as_json:
        document: dict[str, Any] = {
            "objects": checked[0], "bytes": checked[1],
            "corrupt": [vars(d) for d in damaged],
            "index": {"rebuilt": rebuilt, "added": reconciled.added,
                      "dropped": reconciled.dropped, "resized": reconciled.resized}}
        write_json(session.out, document)
    else:
        out = session.out
        for d in damaged:
            out.write(f"corrupt {d.kind} {session.names.route(d.namespace)} {d.name}: "
                      f"{d.reason}; removed {d.path}\n")
        verdict = f"{len(damaged)} corrupt, removed" if damaged else "all intact"
        out.write(f"verified {checked[0]} objects ({human(checked[1])}): {verdict}\n")
        if rebuilt is not None:
            out.write(f"index was {rebuilt}: rebuilt from the files\n")
        if reconciled.added or reconciled.dropped or reconciled.resized:
            out.write(f"index corrected: {reconciled.added} files it did not know, "
                      f"{reconciled.dropped} entries without a file, {reconciled.resized} "
                      "sizes\n")
        elif rebuilt is None:
            out.write("index matches the files\n")
    return 1 if damaged else 0
