"""Cached blobs over TLS (api/blobs.py): 128 KiB reads, from the page cache on the loop
or from the disk in a thread (cache/transfer.py `read_span_cached`), with the SSL
transport's buffer bounded. What a client notices: every byte, ranges, and one upstream
transfer however many TLS clients pull at once.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from gateway.cache import transfer
from gateway.cache.transfer import FetchAborted, read_span_cached
from gateway.config import load_config
from gateway.server import MAX_LINE, create_app
from tests.support.images import sha256_digest as digest_of
from tests.support.served import GatewayTestServer

from .conftest import Served, config_text

MiB = 1 << 20


@pytest.fixture
async def tls_gateway(registry: Callable[..., Awaitable[Served]], tmp_path: Path
                      ) -> AsyncIterator[tuple[Served, str, ssl.SSLContext]]:
    """The gateway app over HTTPS on 127.0.0.1 (a trustme certificate), one route."""
    ca = trustme.CA()
    served = await registry()
    config = load_config(config_text({"docker.io": {"upstream": served.url}}),
                         "routes.yaml", env={})
    server = GatewayTestServer(create_app(config, tmp_path / "data"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    await server.start_server(ssl=context, max_line_size=MAX_LINE, max_field_size=MAX_LINE)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    try:
        yield served, f"https://127.0.0.1:{server.port}", client
    finally:
        await server.close()


async def test_cached_blobs_over_tls_arrive_whole_and_by_range(
        tls_gateway: tuple[Served, str, ssl.SSLContext]) -> None:
    served, url, context = tls_gateway
    data = os.urandom(3 * MiB + 12345)
    digest = served.fake.add_blob(data)
    path = f"{url}/v2/owner/img/blobs/{digest}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        caches: list[str] = []
        while "HIT" not in caches:  # a miss, maybe a follower of it, then the file
            assert len(caches) < 50, caches
            async with http.get(path) as resp:
                assert resp.status == 200
                assert await resp.read() == data
                caches.append(resp.headers["X-Cache"])
            await asyncio.sleep(0.02)
        assert caches[0] == "MISS"
        async with http.get(path, headers={"Range": f"bytes={MiB - 7}-{2 * MiB + 7}"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[MiB - 7:2 * MiB + 8]

        async def pull() -> bytes:
            async with http.get(path) as resp:
                return await resp.read()

        assert {digest_of(b) for b in await asyncio.gather(*(pull() for _ in range(16)))} \
            == {digest}
    assert served.fake.count("GET", f"/v2/owner/img/blobs/{digest}") == 1


@pytest.mark.parametrize("page_cache", [True, False])
async def test_cached_reads_and_thread_reads_give_the_same_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page_cache: bool) -> None:
    """From the page cache on the loop (RWF_NOWAIT), or, where that cannot be used (not
    cached, another OS), in a thread: the same bytes, and a file that ends early is a
    failed read, never a short clean one."""
    if not page_cache:
        monkeypatch.setattr(transfer, "_NOWAIT", None)
    data = os.urandom(300_001)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        async def read(offset: int, count: int) -> tuple[bytes, list[int]]:
            chunks: list[Any] = [c async for c in read_span_cached(fd, offset, count, 128 << 10)]
            return b"".join(chunks), [len(c) for c in chunks]

        assert await read(0, len(data)) == (data, [131072, 131072, 37857])
        assert (await read(1000, 5))[0] == data[1000:1005]
        with pytest.raises(FetchAborted):
            await read(len(data) - 10, 20)
    finally:
        os.close(fd)
