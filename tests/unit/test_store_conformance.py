"""The BlobStore conformance suite: what every store must do (FsStore now; the S3 store
joins the `store` fixture's params). Capabilities are tested only where a store has them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.cache import BlobStore, FsStore, LocalFiles, Redirecting


@pytest.fixture(params=["fs"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "fs":
        scratch = tmp_path / ".spool" / "me"
        scratch.mkdir(parents=True)
        yield FsStore(tmp_path, scratch)


async def _read(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, start, end)])


async def test_missing_objects_are_none_and_delete_is_idempotent(store: BlobStore) -> None:
    assert await store.stat("ns/blobs/sha256/ab/abc") is None
    assert await store.get("ns/tags/x") is None
    with pytest.raises(FileNotFoundError):
        await _read(store, "ns/blobs/sha256/ab/abc")
    await store.delete("ns/blobs/sha256/ab/abc")


async def test_small_objects_put_and_get_whole(store: BlobStore) -> None:
    await store.put("ns/tags/repo/_tags/v1", b"first")
    await store.put("ns/tags/repo/_tags/v1", b"second, longer")
    assert await store.get("ns/tags/repo/_tags/v1") == b"second, longer"
    assert await store.stat("ns/tags/repo/_tags/v1") == len(b"second, longer")


async def test_an_upload_is_invisible_until_committed(store: BlobStore) -> None:
    data = os.urandom(3 << 20) + b"tail"
    upload = store.upload("ns/blobs/sha256/aa/aaaa")
    for offset in range(0, len(data), 1 << 20):
        await upload.write(data[offset:offset + (1 << 20)])
        assert await store.stat("ns/blobs/sha256/aa/aaaa") is None
    await upload.commit()
    assert await store.stat("ns/blobs/sha256/aa/aaaa") == len(data)
    assert await _read(store, "ns/blobs/sha256/aa/aaaa") == data


@pytest.mark.parametrize(("start", "end"), [(0, None), (5, None), (0, 10), (1 << 20, 3 << 20),
                                            (100, 101)])
async def test_byte_ranges_read_exactly(store: BlobStore, start: int, end: int | None) -> None:
    data = os.urandom((3 << 20) + 17)
    upload = store.upload("ns/blobs/sha256/bb/bbbb")
    await upload.write(data)
    await upload.commit()
    assert await _read(store, "ns/blobs/sha256/bb/bbbb", start, end) == data[start:end]


async def test_an_aborted_upload_leaves_nothing(store: BlobStore, tmp_path: Path) -> None:
    upload = store.upload("ns/blobs/sha256/cc/cccc")
    await upload.write(b"half a blob")
    await upload.abort()
    await upload.abort()
    assert await store.stat("ns/blobs/sha256/cc/cccc") is None
    leftovers = await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()])
    assert leftovers == [], leftovers


async def test_an_empty_upload_commits_an_empty_object(store: BlobStore) -> None:
    upload = store.upload("ns/blobs/sha256/dd/dddd")
    await upload.commit()
    assert await store.stat("ns/blobs/sha256/dd/dddd") == 0
    assert await _read(store, "ns/blobs/sha256/dd/dddd") == b""


async def test_concurrent_puts_of_one_key_leave_one_whole_value(store: BlobStore) -> None:
    values = [bytes([i]) * 100_000 for i in range(8)]
    await asyncio.gather(*(store.put("ns/manifests/sha256/ee/eeee", v) for v in values))
    assert await store.get("ns/manifests/sha256/ee/eeee") in values


async def test_delete_removes_a_committed_object(store: BlobStore) -> None:
    await store.put("ns/manifests/sha256/ff/ffff", b"{}")
    await store.delete("ns/manifests/sha256/ff/ffff")
    assert await store.stat("ns/manifests/sha256/ff/ffff") is None


@pytest.mark.parametrize("key", ["/etc/passwd", "ns/../../etc/passwd", ".spool/x", "../x"])
async def test_keys_outside_the_store_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put(key, b"x")


async def test_local_files_capability(store: BlobStore, tmp_path: Path) -> None:
    if not isinstance(store, LocalFiles):
        pytest.fail("every store in this suite today serves local files")
    assert not isinstance(store, Redirecting)
    spool = tmp_path / "verified.spool"
    spool.write_bytes(b"verified bytes")
    await store.adopt("ns/blobs/sha256/11/1111", spool)
    assert not spool.exists(), "adopting moves the file, it does not copy it"
    assert store.local_path("ns/blobs/sha256/11/1111").read_bytes() == b"verified bytes"
    assert await store.stat("ns/blobs/sha256/11/1111") == len(b"verified bytes")


# ------------------------------------------------- the filesystem store's own promises


@pytest.fixture
def fs_store(tmp_path: Path) -> FsStore:
    scratch = tmp_path / ".spool" / "me"
    scratch.mkdir(parents=True)
    return FsStore(tmp_path, scratch)


async def test_fs_a_failed_put_leaves_the_old_object_and_no_temp_file(
        fs_store: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    key = "ns/manifests/sha256/ab/abcd"
    await fs_store.put(key, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        await fs_store.put(key, b"new")
    monkeypatch.undo()
    assert await fs_store.get(key) == b"old"
    assert list(fs_store.scratch.iterdir()) == []


async def test_fs_puts_and_uploads_are_fsynced_before_they_are_renamed(
        fs_store: FsStore, monkeypatch: pytest.MonkeyPatch) -> None:
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
    await fs_store.put("ns/x", b"data")
    upload = fs_store.upload("ns/y")
    await upload.write(b"data")
    await upload.commit()
    monkeypatch.undo()
    assert events == ["fsync", "replace"] * 2
