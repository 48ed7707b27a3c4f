"""The BlobStore conformance suite: what every store must do, passed by FsStore and by
S3Store on a real SeaweedFS (one per module; each test under its own key prefix).
Capabilities are tested only where a store has them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from yarl import URL

from gateway.cache import BlobStore, FsStore, LocalFiles, Redirecting, SizedReads
from gateway.cache.s3 import S3Store, StoreUnavailable
from gateway.config.storage import Redirect, S3Keys, StorageSettings
from tests.support.seaweed import SeaweedFS, run_seaweed

PART = 5 << 20  # S3's smallest part: multipart uploads are exercised with small blobs


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with run_seaweed(tmp_path_factory.mktemp("seaweed")) as running:
        yield running


def s3_settings(seaweed: SeaweedFS, **extra: object) -> StorageSettings:
    return StorageSettings(
        type="s3", endpoint=URL(seaweed.endpoint), bucket=seaweed.bucket, path_style=True,
        prefix=f"t{secrets.token_hex(4)}/", part_size=PART,
        keys=S3Keys(seaweed.access_key, seaweed.secret_key), **extra)  # type: ignore[arg-type]


@pytest.fixture(params=["fs", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "fs":
        scratch = tmp_path / ".spool" / "me"
        scratch.mkdir(parents=True)
        yield FsStore(tmp_path, scratch)
        return
    seaweed: SeaweedFS = request.getfixturevalue("seaweed")
    s3 = S3Store(s3_settings(seaweed))
    await s3.open()
    try:
        yield s3
    finally:
        await s3.close()


async def _leftovers(store: BlobStore, tmp_path: Path,
                     request: pytest.FixtureRequest) -> list[str]:
    """What a store holds beyond its committed objects: temp files, open uploads."""
    if isinstance(store, S3Store):
        seaweed: SeaweedFS = request.getfixturevalue("seaweed")
        return [k for k in await asyncio.to_thread(seaweed.uploads)
                if k.startswith(store.prefix)]
    return await asyncio.to_thread(
        lambda: [str(p) for p in tmp_path.rglob("*") if p.is_file()])


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


async def test_an_aborted_upload_leaves_nothing(store: BlobStore, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    upload = store.upload("ns/blobs/sha256/cc/cccc")
    await upload.write(b"half a blob")
    await upload.abort()
    await upload.abort()
    assert await store.stat("ns/blobs/sha256/cc/cccc") is None
    assert await _leftovers(store, tmp_path, request) == []


async def test_a_large_upload_is_invisible_until_committed_and_aborts_cleanly(
        store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Larger than an S3 part: a multipart upload, parts sent while it is written."""
    data = os.urandom(2 * PART + 12345)
    upload = store.upload("ns/blobs/sha256/ab/big")
    for offset in range(0, len(data), 1 << 20):
        await upload.write(data[offset:offset + (1 << 20)])
    assert await store.stat("ns/blobs/sha256/ab/big") is None
    await upload.commit()
    assert await _read(store, "ns/blobs/sha256/ab/big") == data
    dropped = store.upload("ns/blobs/sha256/ab/dropped")
    for offset in range(0, len(data), 1 << 20):
        await dropped.write(data[offset:offset + (1 << 20)])
    await dropped.abort()
    assert await store.stat("ns/blobs/sha256/ab/dropped") is None
    await store.delete("ns/blobs/sha256/ab/big")
    assert await _leftovers(store, tmp_path, request) == []


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
    if isinstance(store, S3Store):
        assert not isinstance(store, LocalFiles)
        return
    if not isinstance(store, LocalFiles):
        pytest.fail("the filesystem store serves local files")
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


# ------------------------------------------------- the S3 store's own promises


@pytest.fixture
async def s3_store(seaweed: SeaweedFS) -> AsyncIterator[S3Store]:
    s3 = S3Store(s3_settings(seaweed, redirect=Redirect(min_size=1000, expires=60)))
    await s3.open()
    try:
        yield s3
    finally:
        await s3.close()


async def test_s3_one_get_answers_bytes_and_size(s3_store: S3Store, seaweed: SeaweedFS) -> None:
    """SizedReads: the whole object, a range, a suffix, past the end: one request each
    (a 416 also asks for the size, which the client's error names)."""
    assert isinstance(s3_store, SizedReads)
    data = os.urandom(100_000)
    await s3_store.put("ns/blobs/sha256/12/1234", data)
    for wanted, span in [(None, (0, len(data))), ("bytes=10-19", (10, 20)),
                         ("bytes=99990-", (99_990, len(data))), ("bytes=-5", (99_995, len(data)))]:
        before = seaweed.request_count()
        body = await s3_store.open_read("ns/blobs/sha256/12/1234", wanted)
        assert body is not None
        got = b"".join([chunk async for chunk in body.chunks()])
        assert (body.size, body.start, body.end) == (len(data), *span)
        assert got == data[span[0]:span[1]]
        assert seaweed.request_count() - before == 1
    past = await s3_store.open_read("ns/blobs/sha256/12/1234", "bytes=200000-")
    assert past is not None and (past.size, past.start, past.end) == (len(data), 0, 0)
    assert await s3_store.open_read("ns/blobs/sha256/12/none", None) is None


async def test_s3_redirects_to_a_presigned_url_above_the_threshold(s3_store: S3Store) -> None:
    data = os.urandom(5000)
    await s3_store.put("ns/blobs/sha256/34/3456", data)
    assert await s3_store.redirect_url("ns/blobs/sha256/34/3456", 999) is None
    url = await s3_store.redirect_url("ns/blobs/sha256/34/3456", len(data))
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
    fetched = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert fetched == data
    tampered = url.replace("3456?", "3457?")
    with pytest.raises(urllib.error.HTTPError):
        await asyncio.to_thread(lambda: urllib.request.urlopen(tampered, timeout=10).read())


async def test_s3_keys_live_under_the_prefix(s3_store: S3Store, seaweed: SeaweedFS) -> None:
    await s3_store.put("ns/tags/repo/wide/v1", b"x")
    keys = await asyncio.to_thread(seaweed.keys, s3_store.prefix)
    assert keys == {s3_store.prefix + "ns/tags/repo/wide/v1": 1}


async def test_s3_wrong_keys_fail_without_showing_the_secret(seaweed: SeaweedFS) -> None:
    wrong = S3Store(StorageSettings(
        type="s3", endpoint=URL(seaweed.endpoint), bucket=seaweed.bucket, path_style=True,
        keys=S3Keys(seaweed.access_key, "not-the-secret-" + secrets.token_hex(8))))
    await wrong.open()
    try:
        with pytest.raises(StoreUnavailable) as failed:
            await wrong.put("ns/x", b"x")
        assert failed.value.status == 503
        assert "not-the-secret" not in str(failed.value)
    finally:
        await wrong.close()
