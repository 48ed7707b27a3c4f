"""`limits:` against the real gateway process: per-address request and bandwidth buckets
measured over 10 s, the upstream-miss budget, connection floods under a 1,024-descriptor
limit, idle and slowloris timeouts, bodies and oversized headers.

Clients are told apart by their loopback source address (127.0.0.2, .3, ...): the gateway
listens on 127.0.0.1 only. Counts and bytes are asserted, not speeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.fake_registry import FakeRegistry, RunningFake, image_manifest, run_fake_registry
from tests.support.gateway import Gateway

WINDOW = 10.0
REPO = "team/app"


@pytest.fixture
def fake() -> Iterator[RunningFake]:
    with run_fake_registry(FakeRegistry()) as running:
        yield running


def _routes(fake: RunningFake, **limits: Any) -> dict[str, Any]:
    return {"default_route": "fake.registry.test",
            "routes": {"fake.registry.test": {"upstream": fake.url}},
            "limits": limits}


def _session(source: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=(source, 0), force_close=False),
        trust_env=False, timeout=aiohttp.ClientTimeout(total=60))


async def _hammer(gateway: Gateway, source: str, deadline: float, interval: float
                  ) -> tuple[int, list[str]]:
    """GET /v2/ every `interval` until `deadline`: (200s, Retry-After of each 429)."""
    ok, retry = 0, []
    async with _session(source) as http:
        while time.monotonic() < deadline:
            async with http.get(f"{gateway.url()}/v2/") as resp:
                body = await resp.read()
                if resp.status == 200:
                    ok += 1
                else:
                    assert resp.status == 429, (resp.status, body)
                    assert b"TOOMANYREQUESTS" in body
                    retry.append(resp.headers["Retry-After"])
            await asyncio.sleep(interval)
    return ok, retry


async def _download(gateway: Gateway, source: str, path: str, deadline: float) -> int:
    """Body bytes of `path`, fetched over and over, received before `deadline`."""
    received = 0
    async with _session(source) as http:
        while time.monotonic() < deadline:
            async with http.get(f"{gateway.url()}{path}") as resp:
                assert resp.status == 200, resp.status
                async for chunk in resp.content.iter_any():
                    if time.monotonic() >= deadline:
                        return received
                    received += len(chunk)
    return received


async def test_per_ip_request_and_bandwidth_limits_hold_over_10_s(
        start_gateway: Any, fake: RunningFake) -> None:
    blob = bytes(range(256)) * (16 << 10)  # 4 MiB
    digest = fake.fake.add_blob(blob)
    rate, burst = 1_000_000, 250_000
    gateway = start_gateway(_routes(fake, requests_per_second=20, requests_burst=20,
                                    bytes_per_second=rate, bytes_burst=burst,
                                    exempt=["127.0.0.9"]))
    path = f"/v2/{REPO}/blobs/{digest}"
    async with _session("127.0.0.9") as http, http.get(f"{gateway.url()}{path}") as resp:
        assert await resp.read() == blob  # cached now, by an exempt address: no pacing

    deadline = time.monotonic() + WINDOW
    hammered, light, paced_b1, paced_b2, paced_c = await asyncio.gather(
        _hammer(gateway, "127.0.0.2", deadline, 0.01),
        _hammer(gateway, "127.0.0.4", deadline, 0.5),
        _download(gateway, "127.0.0.3", path, deadline),
        _download(gateway, "127.0.0.3", path, deadline),  # shares .3's bucket
        _download(gateway, "127.0.0.4", path, deadline))

    ok, retry_after = hammered
    assert ok == pytest.approx(20 + 20 * WINDOW, rel=0.1)
    assert len(retry_after) > 200 and all(1 <= int(value) <= 2 for value in retry_after)
    # Another address is not touched by .2's bucket: every one of its requests passed.
    assert light[1] == [] and light[0] >= 15
    expected = burst + rate * WINDOW
    assert paced_b1 + paced_b2 == pytest.approx(expected, rel=0.1)
    assert paced_c == pytest.approx(expected, rel=0.1)  # its own bucket, not .3's


async def test_a_strangers_misses_are_limited_while_cached_pulls_go_on(
        start_gateway: Any, fake: RunningFake) -> None:
    layers = [bytes([n]) * 1000 for n in range(6)]
    digests = [fake.fake.add_blob(layer) for layer in layers]
    fake.fake.add_manifest(REPO, image_manifest(layers[0]), tag="v1")
    gateway = start_gateway(_routes(fake, misses_per_minute=6, misses_burst=3,
                                    exempt=["127.0.0.9"]))
    base = f"{gateway.url()}/v2/{REPO}"
    async with _session("127.0.0.9") as http:  # the operator warms one image
        for url in (f"{base}/manifests/v1", f"{base}/blobs/{digests[0]}"):
            async with http.get(url) as resp:
                assert resp.status == 200

    async with _session("127.0.0.2") as http:
        for digest in digests[1:4]:  # the burst of misses
            async with http.get(f"{base}/blobs/{digest}") as resp:
                assert (resp.status, resp.headers["X-Cache"]) == (200, "MISS")
        async with http.get(f"{base}/blobs/{digests[4]}") as resp:
            assert resp.status == 429
            assert 1 <= int(resp.headers["Retry-After"]) <= 10  # one miss per 10 s
            assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
        for _ in range(20):  # cached pulls stay cheap, as many as the client likes
            async with http.get(f"{base}/manifests/v1") as resp:
                assert (resp.status, resp.headers["X-Cache"]) == (200, "HIT")
            async with http.get(f"{base}/blobs/{digests[1]}") as resp:
                assert (resp.status, resp.headers["X-Cache"]) == (200, "HIT")
    assert not [r for r in fake.fake.requests if digests[4] in r.path]  # never asked
    async with _session("127.0.0.3") as http, http.get(f"{base}/blobs/{digests[4]}") as resp:
        assert resp.status == 200  # another address has a budget of its own
    async with _session("127.0.0.1") as http, http.get(f"{gateway.url()}/metrics") as resp:
        text = await resp.text()
    assert 'gateway_refusals_total{reason="misses",route="fake.registry.test"} 1.0' in text


def _open_many(count: int, source: str, port: int) -> list[socket.socket]:
    """`count` connections from `source` (some may be reset at once by the gateway)."""
    held = []
    for n in range(count):
        sock = socket.socket()
        sock.settimeout(5)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
            if n % 10 == 0:  # a slow one: the start of a request, never finished
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        except OSError:
            sock.close()
            continue
        held.append(sock)
    return held


async def test_a_connection_flood_from_one_address_leaves_others_served(
        start_gateway: Any, fake: RunningFake) -> None:
    layer = b"layer" * 1000
    digest = fake.fake.add_blob(layer)
    fake.fake.add_manifest(REPO, image_manifest(layer), tag="v1")
    gateway = start_gateway(_routes(fake, connections_per_ip=100, exempt=[],
                                    server={"idle_timeout": "60s"}), nofile=1024)
    lines_before = len(gateway.log().splitlines())
    held = await asyncio.to_thread(_open_many, 2000, "127.0.0.2", gateway.port)
    try:
        base = f"{gateway.url()}/v2/{REPO}"
        async with _session("127.0.0.3") as http:  # a pull from another address
            async with http.get(f"{base}/manifests/v1") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/blobs/{digest}") as resp:
                assert await resp.read() == layer
        async with _session("127.0.0.2") as http:  # .2 is at its cap: reset, not served
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"{gateway.url()}/v2/") as resp:
                    await resp.read()
        async with _session("127.0.0.1") as http, \
                http.get(f"{gateway.url()}/metrics") as resp:
            text = await resp.text()
        refused = [line for line in text.splitlines()
                   if line.startswith('gateway_refusals_total{reason="connections",')]
        assert refused and float(refused[0].split()[-1]) >= 1800
    finally:
        for sock in held:
            sock.close()
    # 1,900 refusals wrote no line each: at most a summary or two.
    log = gateway.log()
    assert len(log.splitlines()) - lines_before < 20, log[-3000:]
    assert "out of system resource" not in log
    async with _session("127.0.0.2") as http, http.get(f"{gateway.url()}/v2/") as resp:
        assert resp.status == 200  # the flood gone, .2 is served again


async def _closed_after(port: int, send: list[bytes], every: float) -> float:
    """Seconds until the gateway closes a connection that sends `send` pieces, one
    per `every` seconds (then nothing); fails if it answers anything."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        pieces = list(send)
        while True:
            try:
                data = await asyncio.wait_for(reader.read(1024), every)
            except TimeoutError:
                if pieces:
                    writer.write(pieces.pop(0))
                continue
            except ConnectionResetError:
                data = b""
            assert data == b"", data
            return time.monotonic() - started
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_idle_and_slow_connections_close_and_bad_requests_get_4xx(
        start_gateway: Any, fake: RunningFake) -> None:
    gateway = start_gateway(_routes(fake, server={"idle_timeout": "2s", "max_headers": 32,
                                                  "max_header_size": "8KiB"}))
    port = gateway.port
    keepalive = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
    # Idle from the start; slowloris (a header byte every 0.3 s, never the end); idle
    # after one answered request (its answer is read first, see below).
    slowloris = [b"GET /v2/ HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-A: b\r\n"] * 40
    idle, slow = await asyncio.gather(_closed_after(port, [], 0.3),
                                      _closed_after(port, slowloris, 0.3))
    assert 1.5 <= idle <= 6 and 1.5 <= slow <= 6, (idle, slow)

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(keepalive)
    answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), 8)  # body, then the close
    assert time.monotonic() - started <= 6
    writer.close()

    body = await _exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
                                 b"hello")
    assert body.startswith(b"HTTP/1.1 413") and b'"code": "UNSUPPORTED"' in body
    chunked = await _exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413")
    many = b"".join(b"X-H%d: v\r\n" % n for n in range(100))
    too_many = await _exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", too_many), too_many[:100]
    large = await _exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
                                  + b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", large), large[:100]
    lines = len(gateway.log().splitlines())
    for _ in range(50):  # a stranger's garbage: refused, logged once, not 50 times
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", await _exchange(port, b"GET / HTTP/1.1\r\n"
                                                                   + many + b"\r\n"))
    assert len(gateway.log().splitlines()) - lines <= 2
    # A long request line still reaches the handler: an OCI 400, not the parser's.
    name = await _exchange(port, b"GET /v2/" + b"a" * 10000 + b"/manifests/v1 HTTP/1.1\r\n"
                                 b"Host: x\r\n\r\n")
    assert name.startswith(b"HTTP/1.1 400") and b"NAME_INVALID" in name
