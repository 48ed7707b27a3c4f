"""cache/fs.py: atomic writes and commits, spool cleared on open, keys kept inside the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cache.fs import FsStore


@pytest.fixture
async def store(tmp_path: Path) -> FsStore:
    store = FsStore(tmp_path / "data")
    await store.open()
    return store


async def test_open_clears_leftover_spool_but_keeps_committed_objects(tmp_path: Path) -> None:
    first = FsStore(tmp_path / "data")
    await first.open()
    await first.write("ns/manifests/sha256/ab/abcd", b"kept")
    (first.spool_dir / "half-a-layer.1234").write_bytes(b"cut short by a crash")
    (first.spool_dir / "nested").mkdir()
    (first.spool_dir / "nested" / "x").write_bytes(b"x")

    again = FsStore(tmp_path / "data")
    await again.open()
    assert list(again.spool_dir.iterdir()) == []
    assert await again.read("ns/manifests/sha256/ab/abcd") == b"kept"


async def test_open_creates_the_tree(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "a" / "b")
    await store.open()
    assert store.spool_dir.is_dir()


async def test_write_read_stat_delete(store: FsStore) -> None:
    key = "ns/tags/owner/img/_tags/latest"
    assert await store.read(key) is None
    assert await store.stat(key) is None
    await store.write(key, b"one")
    await store.write(key, b"second version")
    assert await store.read(key) == b"second version"
    assert await store.stat(key) == len(b"second version")
    assert store.local_path(key) == store.root / key
    await store.delete(key)
    await store.delete(key)  # missing is fine
    assert await store.read(key) is None
    assert list(store.spool_dir.iterdir()) == []


async def test_commit_moves_the_spool_file_into_place(store: FsStore) -> None:
    spool = store.spool_dir / "blob.tmp"
    spool.write_bytes(b"verified bytes")
    key = "ns/blobs/sha256/aa/aabb"
    await store.commit(key, spool)
    assert not spool.exists()
    assert (store.root / key).read_bytes() == b"verified bytes"
    assert await store.stat(key) == 14


def test_failed_write_leaves_the_old_object_and_no_temp_file(
        store: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "ns/manifests/sha256/ab/abcd"
    store._write_sync(key, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store._write_sync(key, b"new")
    monkeypatch.undo()
    assert (store.root / key).read_bytes() == b"old"
    assert list(store.spool_dir.iterdir()) == []


def test_write_is_fsynced_before_it_is_renamed(store: FsStore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    store._write_sync("ns/x", b"data")
    monkeypatch.undo()
    assert events == ["fsync", "replace"]


@pytest.mark.parametrize("key", ["/etc/passwd", "../outside", "ns/../../outside", "a/../b"])
async def test_keys_cannot_leave_the_root(store: FsStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.write(key, b"x")
    with pytest.raises(ValueError):
        store.local_path(key)
    assert not (store.root.parent / "outside").exists()
