"""The Contents conformance suite: what every catalogue of the store must do for the size
cap (sqlite now; Redis joins the `IMPLEMENTATIONS` list). Time is injected; crashes are
real (a child process that exits without closing); store trees are real files (FsStore).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cache import FsStore
from gateway.cache.contents import Browsable, Root, Target, references
from gateway.cache.store import blob_key, manifest_key, tag_key
from gateway.metrics import Metrics
from gateway.reference import parse_digest
from tests.support.clock import Clock

# name -> "module:Class", constructed as Class(data_dir, clock=..., metrics=...)
IMPLEMENTATIONS = {"sqlite": "gateway.cache.contents_sqlite:SqliteContents"}
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
NS = "docker.io"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
T0 = 1_700_000_000.0

Make = Callable[..., Awaitable[Browsable]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fake(name: str) -> str:
    return digest_of(name.encode())


def image_body(config: str, *layers: str) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"digest": config, "size": 1},
                       "layers": [{"digest": d, "size": 1} for d in layers]}, indent=2).encode()


def index_body(*manifests: str) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": [{"digest": d, "size": 1,
                                      "platform": {"os": "linux", "architecture": f"a{i}"}}
                                     for i, d in enumerate(manifests)]}).encode()


def construct(implementation: str, data_dir: Path, **kwargs: Any) -> Browsable:
    module, _, name = IMPLEMENTATIONS[implementation].partition(":")
    contents: Browsable = getattr(importlib.import_module(module), name)(data_dir, **kwargs)
    return contents


@pytest.fixture
def clock() -> Clock:
    return Clock(frozen=T0)


@pytest.fixture(params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make(implementation: str, clock: Clock, tmp_path: Path) -> AsyncIterator[Make]:
    """Factory: an opened catalogue of a data directory (several may share one)."""
    opened: list[Browsable] = []

    async def start(data_dir: Path | None = None, **kwargs: Any) -> Browsable:
        kwargs.setdefault("clock", clock)
        contents = construct(implementation, data_dir or tmp_path / "data", **kwargs)
        await contents.open()
        opened.append(contents)
        return contents

    yield start
    for contents in reversed(opened):
        await contents.close()


@pytest.fixture
async def contents(make: Make) -> Browsable:
    return await make()


class Tree:
    """A real store tree written with FsStore, as the gateway writes it."""

    def __init__(self, data_dir: Path) -> None:
        scratch = data_dir / ".spool" / "test"
        scratch.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.store = FsStore(data_dir, scratch)

    async def blob(self, data: bytes, namespace: str = NS) -> str:
        digest = digest_of(data)
        await self.store.put(blob_key(namespace, parse_digest(digest)), data)
        return digest

    async def manifest(self, body: bytes, media_type: str = OCI_MANIFEST,
                       namespace: str = NS) -> str:
        digest = digest_of(body)
        await self.store.put(manifest_key(namespace, parse_digest(digest)),
                             media_type.encode() + b"\n" + body)
        return digest

    async def tag(self, repository: str, tag: str, digest: str, namespace: str = NS) -> None:
        await self.store.put(tag_key(namespace, repository, tag, "_tags"), json.dumps(
            {"digest": digest, "media_type": OCI_MANIFEST, "checked": T0}).encode())

    def path(self, kind: str, digest: str, namespace: str = NS) -> Path:
        key = (blob_key if kind == "blob" else manifest_key)(namespace, parse_digest(digest))
        return self.data_dir / key

    def disk_usage(self) -> int:
        return sum(p.stat().st_size for kind in ("blobs", "manifests")
                   for p in (self.data_dir / NS / kind).rglob("*") if p.is_file())


async def add_image(contents: Browsable, name: str, *blobs: tuple[str, int],
                    repository: str = "library/app", size: int = 500) -> str:
    """Blobs (name, size) and a manifest referencing them; returns the manifest digest."""
    for blob, blob_size in blobs:
        await contents.add_blob(NS, fake(blob), blob_size)
    digest = fake(name)
    await contents.add_manifest(NS, digest, size, repository,
                                [("blob", fake(b)) for b, _ in blobs])
    return digest


def freed(root: Root) -> set[str]:
    return {e.digest for e in root.frees}


# ------------------------------------------------------------------ counting and roots


async def test_shared_blobs_are_counted_once(contents: Browsable) -> None:
    await add_image(contents, "a", ("base", 1000), ("a-layer", 10))
    await add_image(contents, "b", ("base", 1000), ("b-layer", 20))
    usage = await contents.usage()
    assert usage.total == 1000 + 10 + 20 + 2 * 500
    assert usage.objects == 5
    assert usage.by_namespace == {NS: usage.total}


async def test_a_root_frees_itself_and_what_only_it_references(contents: Browsable,
                                                               clock: Clock) -> None:
    a = await add_image(contents, "a", ("base", 1000), ("a-layer", 10))
    clock.advance(1)
    b = await add_image(contents, "b", ("base", 1000), ("b-layer", 20))
    roots = await contents.roots()
    assert [r.entry.digest for r in roots] == [a, b]  # no blob is a root: all referenced
    assert freed(roots[0]) == {a, fake("a-layer")}
    assert roots[0].size == 510 and roots[0].repositories == ("library/app",)
    assert freed(roots[1]) == {b, fake("b-layer")}

    removed = await contents.remove(roots[0])
    assert {e.digest for e in removed} == {a, fake("a-layer")}
    # The shared layer is now only b's: removing b frees it too.
    (root,) = await contents.roots()
    assert freed(root) == {b, fake("b-layer"), fake("base")}
    assert (await contents.usage()).total == 1000 + 20 + 500


async def test_a_multi_arch_index_holds_its_manifests_and_their_blobs(contents: Browsable,
                                                                      clock: Clock) -> None:
    amd = await add_image(contents, "amd64", ("amd-config", 5), ("shared", 300))
    arm = await add_image(contents, "arm64", ("arm-config", 5), ("shared", 300))
    index = fake("index")
    await contents.add_manifest(NS, index, 800, "library/app",
                                [("manifest", amd), ("manifest", arm)])
    await contents.add_tag(NS, "library/app", "1.0", index)
    (root,) = await contents.roots()
    assert root.entry.digest == index and root.entry.kind == "manifest"
    assert root.tags == (("library/app", "1.0"),)
    assert freed(root) == {index, amd, arm, fake("amd-config"), fake("arm-config"),
                           fake("shared")}
    # Another image takes the shared layer: the index no longer frees it.
    clock.advance(1)
    other = await add_image(contents, "other", ("shared", 300), ("own", 7))
    roots = await contents.roots()
    assert [r.entry.digest for r in roots] == [index, other]
    assert fake("shared") not in freed(roots[0])
    assert freed(roots[1]) == {other, fake("own")}
    assert [e.digest for e in await contents.referrers(NS, "manifest", amd)] == [index]


async def test_roots_are_least_recently_used_first_by_their_closure(contents: Browsable,
                                                                    clock: Clock) -> None:
    child = await add_image(contents, "child", ("c", 1))
    index = fake("index")
    await contents.add_manifest(NS, index, 10, "library/app", [("manifest", child)])
    clock.advance(10)
    b = await add_image(contents, "b", ("b-layer", 1))
    clock.advance(10)
    await contents.add_blob(NS, fake("loose"), 3)
    assert [r.entry.digest for r in await contents.roots()] == [index, b, fake("loose")]
    clock.advance(10)
    contents.touch(NS, "manifest", child)  # a pull by the platform manifest's digest
    roots = await contents.roots()
    assert [r.entry.digest for r in roots] == [b, fake("loose"), index]
    assert roots[-1].last_access == T0 + 30
    assert [r.entry.digest for r in await contents.roots(idle_before=T0 + 15)] == [b]
    assert [r.entry.digest for r in await contents.roots(limit=1)] == [b]
    assert await contents.roots(namespace="ghcr.io") == []


async def test_touches_are_batched_until_a_flush(make: Make, clock: Clock) -> None:
    contents = await make()
    other = await make()  # another process on the same index
    digest = await add_image(contents, "a", ("layer", 1))
    clock.advance(60)
    contents.touch(NS, "manifest", digest)
    contents.touch(NS, "blob", fake("layer"))
    contents.touch(NS, "blob", fake("never-cached"))  # harmless
    found = await other.find(NS, "manifest", digest)
    assert found is not None and found.last_access == T0  # not written per request
    await contents.flush()
    found = await other.find(NS, "manifest", digest)
    assert found is not None and found.last_access == T0 + 60
    layer = await other.find(NS, "blob", fake("layer"))
    assert layer is not None and layer.last_access == T0 + 60
    assert await other.find(NS, "blob", fake("never-cached")) is None
    (root,) = await other.roots()
    assert root.last_access == T0 + 60


async def test_close_writes_the_last_touches(make: Make, clock: Clock, tmp_path: Path) -> None:
    contents = await make(tmp_path / "d")
    digest = await add_image(contents, "a", ("layer", 1))
    clock.advance(5)
    contents.touch(NS, "manifest", digest)
    await contents.close()
    again = await make(tmp_path / "d")
    found = await again.find(NS, "manifest", digest)
    assert found is not None and found.last_access == T0 + 5


async def test_remove_recomputes_what_it_frees(contents: Browsable, clock: Clock) -> None:
    a = await add_image(contents, "a", ("a-only", 10), ("base", 100))
    clock.advance(1)
    await add_image(contents, "b", ("base", 100))
    root = (await contents.roots())[0]
    assert freed(root) == {a, fake("a-only")}
    # Between listing and removing, a new manifest started referencing a's layer.
    clock.advance(1)
    await add_image(contents, "c", ("a-only", 10))
    removed = await contents.remove(root)
    assert [e.digest for e in removed] == [a]
    assert await contents.find(NS, "blob", fake("a-only")) is not None
    assert await contents.find(NS, "manifest", a) is None


async def test_remove_refuses_a_root_that_changed(contents: Browsable, clock: Clock) -> None:
    await contents.add_blob(NS, fake("loose"), 10)
    a = await add_image(contents, "a", ("layer", 1))
    blob_root, image_root = await contents.roots()
    # The loose blob got a referrer: no longer a root.
    await add_image(contents, "b", ("loose", 10))
    assert await contents.remove(blob_root) == []
    # The image was read after it was listed.
    clock.advance(5)
    contents.touch(NS, "manifest", a)
    assert await contents.remove(image_root) == []
    assert await contents.find(NS, "manifest", a) is not None
    fresh = await contents.root_of(NS, "manifest", a)
    assert fresh is not None and {e.digest for e in await contents.remove(fresh)} == \
        {a, fake("layer")}


async def test_forget_drops_an_object_found_missing(contents: Browsable) -> None:
    a = await add_image(contents, "a", ("one", 10), ("two", 20))
    await contents.forget(NS, "blob", fake("one"))
    assert (await contents.usage()).total == 20 + 500
    (root,) = await contents.roots()
    assert freed(root) == {a, fake("two")}
    # Fetched again: counted again, still a's.
    await contents.add_blob(NS, fake("one"), 10)
    (root,) = await contents.roots()
    assert freed(root) == {a, fake("one"), fake("two")}
    # The manifest gone: its blobs are unreferenced roots.
    await contents.forget(NS, "manifest", a)
    assert {r.entry.digest for r in await contents.roots()} == {fake("one"), fake("two")}


async def test_preview_follows_the_plan_as_if_each_root_were_removed(
        contents: Browsable, clock: Clock) -> None:
    a = await add_image(contents, "a", ("base", 1000), ("a-layer", 10))
    clock.advance(1)
    b = await add_image(contents, "b", ("base", 1000), ("b-layer", 10), repository="pinned/x")
    clock.advance(1)
    c = await add_image(contents, "c", ("base", 1000), ("c-layer", 10))
    usage = (await contents.usage()).total

    def keep(root: Root) -> bool:
        return "pinned/x" in root.repositories

    plan = [Target("size", max_bytes=usage - 600)]
    assert [(t.reason, r.entry.digest) for t, r in await contents.preview(plan, keep)] == \
        [("size", a), ("size", c)]
    # c frees the base layer too: a is gone (in the preview) and b is kept, not removed.
    _, (_, c_root) = await contents.preview(plan, keep)
    assert freed(c_root) == {c, fake("c-layer")}
    everything = await contents.preview([Target("size", max_bytes=0)], lambda r: False)
    assert [r.entry.digest for _, r in everything] == [a, b, c]
    assert sum(r.size for _, r in everything) == usage
    idle = await contents.preview([Target("idle", idle_before=T0 + 1)], lambda r: False)
    assert [r.entry.digest for _, r in idle] == [a]
    assert len(await contents.roots()) == 3  # nothing was removed


async def test_images_and_repositories_list_what_is_cached(contents: Browsable,
                                                           clock: Clock) -> None:
    a = await add_image(contents, "a", ("base", 1000), ("a-layer", 10))
    clock.advance(1)
    b = await add_image(contents, "b", ("base", 1000), ("b-layer", 20), repository="other/b")
    await contents.add_tag(NS, "other/b", "v1", b)
    await contents.add_blob(NS, fake("loose"), 3)
    images = await contents.images()
    assert [i.entry.digest for i in images] == [b, a]  # most recent first
    assert (images[0].size, images[0].unique) == (1520, 520)
    assert images[0].tags == (("other/b", "v1"),)
    assert (images[1].size, images[1].unique) == (1510, 510)
    repositories = await contents.repositories()
    assert [(r.repository, r.size, r.manifests) for r in repositories] == \
        [("other/b", 1520, 1), ("library/app", 1510, 1)]
    assert await contents.tagged(NS, "other/b", "v1") == [b]


async def test_several_instances_share_one_catalogue(make: Make) -> None:
    first, second = await make(), await make()
    await add_image(first, "a", ("layer", 10))
    assert (await second.usage()).total == 510
    (root,) = await second.roots()
    assert {e.digest for e in await second.remove(root)} == {fake("a"), fake("layer")}
    assert (await first.usage()).total == 0


# ------------------------------------------------------------------ the files are the truth


async def write_tree(tree: Tree) -> dict[str, str]:
    base = await tree.blob(b"base layer " * 100)
    amd = await tree.manifest(image_body(await tree.blob(b"amd config"), base,
                                         await tree.blob(b"amd layer")))
    arm = await tree.manifest(image_body(await tree.blob(b"arm config"), base))
    index = await tree.manifest(index_body(amd, arm), OCI_INDEX)
    await tree.tag("library/app", "1.0", index)
    single = await tree.manifest(image_body(await tree.blob(b"single config"), base))
    loose = await tree.blob(b"a blob no manifest references")
    return {"base": base, "amd": amd, "arm": arm, "index": index, "single": single,
            "loose": loose}


async def test_an_index_is_rebuilt_from_the_store_tree(implementation: str, make: Make,
                                                       tmp_path: Path) -> None:
    tree = Tree(tmp_path / "data")
    d = await write_tree(tree)
    metrics = Metrics()
    contents = await make(metrics=metrics)
    await contents.settled()
    usage = await contents.usage()
    assert usage.total == tree.disk_usage()
    assert usage.objects == 10  # 6 blobs, 4 manifests
    roots = {r.entry.digest: r for r in await contents.roots()}
    assert set(roots) == {d["index"], d["single"], d["loose"]}
    assert roots[d["index"]].tags == (("library/app", "1.0"),)
    assert roots[d["index"]].repositories == ("library/app",)
    assert d["base"] not in freed(roots[d["index"]])  # shared with the single image
    assert len(roots[d["index"]].frees) == 6
    # A file's mtime stands in for its last access, for blobs found after their manifest too.
    base = await contents.find(NS, "blob", d["base"])
    assert base is not None
    assert base.last_access == pytest.approx(tree.path("blob", d["base"]).stat().st_mtime)
    # Platform manifests belong to their index's repository.
    (child,) = [r for r in await contents.repositories() if r.repository == "library/app"]
    assert child.manifests == 3
    assert metrics.registry.get_sample_value(
        "gateway_index_rebuilds_total", {"reason": "missing"}) == 1.0


async def test_a_new_data_directory_is_not_a_rebuild(make: Make) -> None:
    metrics = Metrics()
    contents = await make(metrics=metrics)
    await contents.settled()
    assert (await contents.usage()).total == 0
    assert metrics.registry.get_sample_value(
        "gateway_index_rebuilds_total", {"reason": "missing"}) is None


CRASHING_CHILD = """
import asyncio, json, os, sys
from pathlib import Path
from tests.unit.test_contents_conformance import construct

async def main():
    implementation, data_dir, steps = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    contents = construct(implementation, data_dir)
    await contents.open()
    await contents.settled()
    for method, args in steps:
        await getattr(contents, method)(*args)
    contents.touch(steps[0][1][0], "blob", steps[0][1][1])  # never flushed
    os._exit(9)  # as kill -9: no close, no flush

asyncio.run(main())
"""


def run_and_crash(implementation: str, data_dir: Path, steps: list[Any]) -> None:
    done = subprocess.run([sys.executable, "-c", CRASHING_CHILD, implementation,
                           str(data_dir), json.dumps(steps)], cwd=REPOSITORY_ROOT,
                          capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr.decode()


async def test_after_a_crash_the_index_is_reconciled_with_the_disk(
        implementation: str, make: Make, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    tree = Tree(data_dir)
    kept = await tree.blob(b"kept")
    lost = await tree.blob(b"deleted behind the index's back")
    manifest = await tree.manifest(image_body(kept, lost))
    size = tree.path("manifest", manifest).stat().st_size
    steps = [["add_blob", [NS, kept, 4]], ["add_blob", [NS, lost, 31]],
             ["add_manifest", [NS, manifest, size, "library/app", [["blob", kept],
                                                                  ["blob", lost]]]]]
    await asyncio.to_thread(run_and_crash, implementation, data_dir, steps)
    tree.path("blob", lost).unlink()  # a row without its file
    unknown = await tree.blob(b"committed, then the process died before indexing it")

    contents = await make(data_dir)
    await contents.settled()
    assert await contents.find(NS, "blob", lost) is None
    found = await contents.find(NS, "blob", unknown)
    assert found is not None and found.size == len(b"committed, then the process died "
                                                   b"before indexing it")
    assert (await contents.usage()).total == tree.disk_usage()
    roots = {r.entry.digest: r for r in await contents.roots()}
    assert set(roots) == {manifest, unknown}
    assert freed(roots[manifest]) == {manifest, kept}
    assert roots[manifest].repositories == ("library/app",)  # what the index knew stays


async def test_a_clean_stop_needs_no_reconciliation(make: Make, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = await make(data_dir)
    await first.add_blob(NS, fake("indexed, no file"), 5)
    await first.close()
    again = await make(data_dir)
    await again.settled()
    # Not reconciled: the entry stays until someone finds its file missing.
    assert await again.find(NS, "blob", fake("indexed, no file")) is not None
    found = await again.reconcile()
    assert found.dropped == 1
    assert await again.find(NS, "blob", fake("indexed, no file")) is None


# ------------------------------------------------------------------ the sqlite file itself


@pytest.mark.parametrize("damage", ["garbage", "truncated", "schema"])
async def test_a_broken_sqlite_file_is_rebuilt(damage: str, clock: Clock, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    tree = Tree(data_dir)
    d = await write_tree(tree)
    first = construct("sqlite", data_dir, clock=clock)
    await first.open()
    await first.settled()
    await first.close()
    index = data_dir / "index.sqlite"
    if damage == "garbage":
        index.write_bytes(os.urandom(8192))
    elif damage == "truncated":
        with index.open("r+b") as file:
            file.truncate(index.stat().st_size // 2)
    else:
        with sqlite3.connect(index) as db:
            db.execute("PRAGMA user_version = 99")
    metrics = Metrics()
    contents = construct("sqlite", data_dir, clock=clock, metrics=metrics)
    await contents.open()
    try:
        await contents.settled()
        assert (await contents.usage()).total == tree.disk_usage()
        assert {r.entry.digest for r in await contents.roots()} == \
            {d["index"], d["single"], d["loose"]}
        reason = "schema" if damage == "schema" else "corrupt"
        assert metrics.registry.get_sample_value(
            "gateway_index_rebuilds_total", {"reason": reason}) == 1.0
    finally:
        await contents.close()


def test_references_are_read_from_manifests() -> None:
    config, layer = fake("config"), fake("layer")
    assert references(image_body(config, layer, layer)) == (("blob", config), ("blob", layer))
    assert references(index_body(config)) == (("manifest", config),)
    assert references(b"not json") == ()
    subject = json.dumps({"config": {"digest": config}, "subject": {"digest": layer},
                          "layers": [{"digest": "sha256:short"}]}).encode()
    assert references(subject) == (("blob", config),)


async def test_late_calls_after_close_are_harmless(implementation: str, clock: Clock,
                                                   tmp_path: Path) -> None:
    """A transfer that ends during shutdown: its write is not lost for good (the next open
    reconciles with the store), and nothing raises into the request."""
    data_dir = tmp_path / "data"
    tree = Tree(data_dir)
    contents = construct(implementation, data_dir, clock=clock)
    await contents.open()
    await contents.close()
    late = await tree.blob(b"committed during shutdown")
    contents.touch(NS, "blob", late)
    await contents.flush()
    await contents.add_blob(NS, late, 25)
    again = construct(implementation, data_dir, clock=clock)
    await again.open()
    try:
        await again.settled()
        assert await again.find(NS, "blob", late) is not None
    finally:
        await again.close()


WRITING_CHILD = """
import asyncio, hashlib, sys
from pathlib import Path
from tests.unit.test_contents_conformance import NS, construct, fake

async def main():
    implementation, data_dir, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    contents = construct(implementation, data_dir)
    await contents.open()
    for i in range(40):
        blobs = [fake(f"{name}-{i}-{j}") for j in range(5)] + [fake("shared")]
        for blob in blobs:
            await contents.add_blob(NS, blob, 10)
        await contents.add_manifest(NS, fake(f"{name}-{i}"), 100, "repo",
                                    [("blob", b) for b in blobs])
        contents.touch(NS, "manifest", fake(f"{name}-{i}"))
    await contents.close()

asyncio.run(main())
"""


async def test_processes_write_to_one_catalogue_at_once(implementation: str, make: Make,
                                                        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    children = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITING_CHILD, implementation, str(data_dir), name,
        cwd=REPOSITORY_ROOT, stderr=subprocess.PIPE) for name in ("one", "two", "three")]
    for child in children:
        _, stderr = await child.communicate()
        assert child.returncode == 0, stderr.decode()
    contents = await make(data_dir)
    usage = await contents.usage()
    assert (usage.objects, usage.total) == (3 * 40 * 6 + 1, 3 * 40 * (5 * 10 + 100) + 10)
    roots = await contents.roots(limit=1000)
    assert len(roots) == 120
    assert sum(r.size for r in roots) == 3 * 40 * (5 * 10 + 100)  # the shared blob is held
