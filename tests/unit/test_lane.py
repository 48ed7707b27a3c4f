"""The registry lane (gateway/server/lane.py): manifest requests served by the pipeline's
stages without aiohttp's router, a cached one written as one buffer.

Held against the app's own path (the same config on aiohttp's runner, `lane=False`): the
same statuses, bodies, headers, log lines, metrics and pull counts. Then what only the
lane does: the raw write is taken, HTTP/1.0 and pipelined requests, refusals and
revalidation through it, a client that reads nothing, requests it hands to the app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway import admin
from gateway.config import load_config
from gateway.server import create_app
from gateway.server import lane as lane_module
from tests.support.fake_registry import image_manifest
from tests.support.images import OCI_MANIFEST
from tests.support.images import sha256_digest as digest_of
from tests.support.served import GatewayTestServer
from tests.support.wait import wait_until

from .conftest import Gateway, Served, config_text

ACCEPT = {"Accept": OCI_MANIFEST}
VARYING = {"date", "x-request-id"}  # per request or per moment, whichever path answers
COUNTED = ("gateway_requests_total", "gateway_cache_requests_total",
           "gateway_bytes_served_total", "gateway_request_seconds_count",
           "gateway_upstream_requests_total")
REPO = "/v2/library/app/manifests"


CONFIG = b'{"architecture": "amd64", "os": "linux"}'
BLOB = f"/v2/library/app/blobs/{digest_of(CONFIG)}"


async def _pair(registry: Callable[..., Awaitable[Served]],
                gateway: Callable[..., Awaitable[Gateway]], **top: Any
                ) -> tuple[Served, str, Gateway, Gateway]:
    """One upstream with `library/app:v1` (its config a small blob); a gateway with the
    lane and one without."""
    hub = await registry()
    hub.fake.add_blob(CONFIG)
    digest = hub.fake.add_manifest("library/app", image_manifest(b"layer", config=CONFIG),
                                   tag="v1")
    routes = {"docker.io": {"upstream": hub.url}}
    with_lane = await gateway(routes, default_route="docker.io", **top)
    without = await gateway(routes, default_route="docker.io", lane=False, **top)
    return hub, digest, with_lane, without


def _written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths whose answers the lane wrote itself (not through aiohttp's Response)."""
    seen: list[str] = []
    write = lane_module.RegistryLane._write

    def spy(self: Any, request: Any, *args: Any) -> Any:
        answer = write(self, request, *args)
        if answer:
            seen.append(f"{request.method} {request.path}")
        return answer

    monkeypatch.setattr(lane_module.RegistryLane, "_write", spy)
    return seen


def _log_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    for line in lines:
        for key in ("ts", "id", "duration_ms", "host", "upstream"):  # ports, times, ids
            line.pop(key)
    return lines


def _counted(gw: Gateway) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(gw.metrics.render().decode())
            for s in family.samples if s.name in COUNTED}


async def _answers(gw: Gateway, calls: list[tuple[str, str]], **headers: str
                   ) -> list[tuple[int, dict[str, str], bytes]]:
    """Each (method, manifest reference or /v2/ path): status, headers, body."""
    out = []
    for method, ref in calls:
        path = ref if ref.startswith("/v2/") else f"{REPO}/{ref}"
        resp = await gw.client.request(method, path, headers={**ACCEPT, **headers})
        out.append((resp.status, {k.lower(): v for k, v in resp.headers.items()
                                  if k.lower() not in VARYING},
                    await resp.read()))
    return out


async def test_lane_answers_as_the_apps_path_does(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    hub, digest, fast, slow = await _pair(registry, gateway)
    written = _written(monkeypatch)
    caplog.set_level(logging.INFO, logger="gateway.access")
    calls = [("GET", "v1"), ("GET", "v1"), ("GET", digest), ("HEAD", "v1"), ("HEAD", digest),
             ("GET", "v2"), ("GET", "sha256:" + "0" * 64), ("GET", "bad@ref")]
    answers, logs = [], []
    for gw in (fast, slow):
        caplog.clear()
        answers.append(await _answers(gw, calls))
        logs.append(_log_lines(caplog))
    assert answers[0] == answers[1]
    assert [(status, h.get("x-cache")) for status, h, _ in answers[0]] == [
        (200, "MISS"), (200, "HIT"), (200, "HIT"), (200, "HIT"), (200, "HIT"),
        (404, "-"), (404, "-"), (400, "-")]
    assert logs[0] == logs[1] and len(logs[0]) == len(calls)
    assert _counted(fast) == _counted(slow)
    pulls = [gw.app[admin.STATUS].pulls.top(5) for gw in (fast, slow)]
    assert pulls[0] == pulls[1] and pulls[0][0]["pulls"] == 3  # GETs answered 200
    # The four HITs were written by the lane itself; the MISS and errors by aiohttp.
    assert written == [f"GET {REPO}/v1", f"GET {REPO}/{digest}", f"HEAD {REPO}/v1",
                       f"HEAD {REPO}/{digest}"]
    assert hub.fake.count("GET", "/v2/library/app/manifests/v1") == 2  # once per gateway


async def test_small_blobs_in_the_lane_are_the_apps(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    hub, _digest, fast, slow = await _pair(registry, gateway)
    written = _written(monkeypatch)
    caplog.set_level(logging.INFO, logger="gateway.access")
    # Fetched (MISS), read from the store and kept, then held: the lane writes that one.
    calls = [("GET", BLOB), ("GET", BLOB), ("HEAD", BLOB), ("GET", BLOB)]
    answers, ranged, logs = [], [], []
    for gw in (fast, slow):
        caplog.clear()
        first = await _answers(gw, [("GET", BLOB)])
        await wait_until(lambda gw=gw: not gw.services.cache.blobs.flights.items(),
                         what="the config blob committed")
        answers.append(first + await _answers(gw, calls))
        ranged.append(await _answers(gw, [("GET", BLOB)], Range="bytes=2-5"))
        logs.append(_log_lines(caplog))
    assert answers[0] == answers[1] and ranged[0] == ranged[1] and logs[0] == logs[1]
    assert [a[0] for a in answers[0]] == [200] * 5 and ranged[0][0][0] == 206
    assert all(body == CONFIG for _s, _h, body in answers[0][:3]) and ranged[0][0][2] == CONFIG[2:6]
    outcomes = [h["x-cache"] for _s, h, _b in answers[0]]
    assert outcomes[0] == "MISS" and outcomes[2:] == ["HIT"] * 3
    assert _counted(fast) == _counted(slow)
    # Held once read whole: the later GETs (not the HEAD, not the Range: the app's).
    assert written and set(written) == {f"GET {BLOB}"} and len(written) <= 3
    assert len(hub.fake.blob_requests()) == 2  # once per gateway


async def _raw(port: int, data: bytes, *, until_closed: bool = False,
               answers: int = 1) -> bytes:
    """What the server sends back to `data` on one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            got += chunk
            if not chunk or (not until_closed and got.count(b"HTTP/1.") >= answers
                             and got.endswith(b"}")):
                return got
    finally:
        writer.close()


async def test_http10_and_pipelined_requests(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch) -> None:
    _hub, digest, fast, _slow = await _pair(registry, gateway)
    assert (await fast.client.get(f"{REPO}/v1", headers=ACCEPT)).status == 200
    written = _written(monkeypatch)
    port = fast.client.port
    # HTTP/1.0 and Connection: close are sent by aiohttp (its Connection header, then close).
    old = await _raw(port, f"GET {REPO}/{digest} HTTP/1.0\r\n\r\n".encode(), until_closed=True)
    assert old.startswith(b"HTTP/1.0 200 OK\r\n") and old.endswith(b"}") and not written
    closing = await _raw(port, f"GET {REPO}/v1 HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}"
                               "\r\nConnection: close\r\n\r\n".encode(), until_closed=True)
    assert b"Connection: close" in closing and not written
    # Three at once on one connection: three whole answers in order, each its own id.
    one = f"GET {REPO}/v1 HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}\r\n\r\n"
    head = f"HEAD {REPO}/{digest} HTTP/1.1\r\nHost: x\r\n\r\n"
    got = await _raw(port, (one + head + one).encode(), answers=3)
    parts = got.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(parts) == 3 and len(written) == 3
    ids = {line for p in parts for line in p.split(b"\r\n") if line.startswith(b"X-Request-Id")}
    assert len(ids) == 3
    body = parts[0].split(b"\r\n\r\n", 1)[1]
    assert parts[1].endswith(b"\r\n\r\n")  # HEAD: headers only, the same length declared
    assert f"Content-Length: {len(body)}".encode() in parts[1]


async def test_refusals_in_the_lane_are_the_apps(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]]) -> None:
    top = {"access": {"deny": ["127.0.0.0/8"]}}
    _hub, _digest, fast, slow = await _pair(registry, gateway, **top)
    denied = [await _answers(gw, [("GET", "v1")]) for gw in (fast, slow)]
    assert denied[0] == denied[1] and denied[0][0][0] == 403
    assert json.loads(denied[0][0][2])["errors"][0]["code"] == "DENIED"
    limits = {"limits": {"requests_per_second": 1, "requests_burst": 1, "exempt": []}}
    _hub, _digest, fast, slow = await _pair(registry, gateway, **limits)
    limited = [await _answers(gw, [("GET", "v1"), ("GET", "v1")]) for gw in (fast, slow)]
    assert [a[0] for a in limited[0]] == [a[0] for a in limited[1]] == [200, 429]
    assert limited[0][1][1]["retry-after"] == limited[1][1][1]["retry-after"]


async def test_a_tag_past_its_ttl_is_asked_upstream_not_held(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = await registry()
    hub.fake.add_manifest("library/app", image_manifest(b"one"), tag="v1")
    gw = await gateway({"docker.io": {"upstream": hub.url, "tag_ttl": "1s",
                                      "stale_while_revalidate": "0s"}},
                       default_route="docker.io")
    written = _written(monkeypatch)
    first = await gw.client.get(f"{REPO}/v1", headers=ACCEPT)
    assert first.status == 200 and (await gw.client.get(f"{REPO}/v1", headers=ACCEPT)
                                    ).headers["X-Cache"] == "HIT"
    moved = hub.fake.add_manifest("library/app", image_manifest(b"two"), tag="v1")
    await asyncio.sleep(1.1)
    again = await gw.client.get(f"{REPO}/v1", headers=ACCEPT)
    assert again.headers["Docker-Content-Digest"] == moved and len(written) == 1


async def test_a_client_that_reads_nothing_holds_a_bounded_buffer(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]]) -> None:
    _hub, _digest, fast, _slow = await _pair(registry, gateway)
    one = f"GET {REPO}/v1 HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}\r\n\r\n".encode()
    assert (await fast.client.get(f"{REPO}/v1", headers=ACCEPT)).status == 200
    sock = socket.create_connection(("127.0.0.1", fast.client.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    server = fast.client.server.runner.server  # type: ignore[union-attr]
    try:
        await loop.sock_sendall(sock, one)
        assert (await loop.sock_recv(sock, 65536)).startswith(b"HTTP/1.1 200")
        # The kernel's buffers small on both ends: what is not taken stays in the process.
        for handler in server.connections:
            handler.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(40):  # 2,000 answers (~1.6 MB) asked for, none read
            await loop.sock_sendall(sock, one * 50)
        await asyncio.sleep(0.5)
        buffered = [h.transport.get_write_buffer_size() for h in server.connections
                    if h.transport is not None]
        assert buffered and 0 < max(buffered) <= lane_module.HIGH_WATER + 4096
    finally:
        sock.close()


async def test_requests_the_lane_does_not_serve_go_to_the_app(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = await registry()
    layer = b"a layer"
    blob = hub.fake.add_blob(layer)
    # A repository named ".../manifests/...": resolve finds a blob call, the app serves it.
    hub.fake.add_manifest("a/manifests/b", image_manifest(layer))
    gw = await gateway({"docker.io": {"upstream": hub.url}}, default_route="docker.io")
    written = _written(monkeypatch)
    resp = await gw.client.get(f"/v2/a/manifests/b/blobs/{blob}")
    assert resp.status == 200 and await resp.read() == layer
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert resp.headers["X-Request-Id"] and resp.headers["X-Registry-Route"] == "docker.io"
    put = await gw.client.put(f"{REPO}/v1", data=b"{}")
    assert put.status == 405 and put.headers["Allow"] == "GET, HEAD"
    assert not written


async def test_with_redirect_http_plain_requests_are_redirected_https_ones_served(
        registry: Callable[..., Awaitable[Served]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    hub = await registry()
    hub.fake.add_manifest("library/app", image_manifest(b"layer"), tag="v1")
    config = load_config(config_text({"docker.io": {"upstream": hub.url}},
                                      default_route="docker.io",
                                      trusted_proxies=["127.0.0.0/8"]), "routes.yaml", env={})
    server = GatewayTestServer(create_app(config, tmp_path / "data", https_port=8443))
    written = _written(monkeypatch)
    async with TestClient(server) as client:
        plain = await client.get(f"{REPO}/v1", headers={**ACCEPT, "Host": "hub.gw.test"},
                                 allow_redirects=False)
        assert plain.status == 308
        assert plain.headers["Location"] == f"https://hub.gw.test:8443{REPO}/v1"
        # Behind a TLS-terminating proxy the gateway trusts: served, by the lane once cached.
        behind = {**ACCEPT, "X-Forwarded-Proto": "https"}
        statuses = [(r.status, r.headers["X-Cache"]) for r in
                    [await client.get(f"{REPO}/v1", headers=behind) for _ in range(2)]]
        assert statuses == [(200, "MISS"), (200, "HIT")] and written == [f"GET {REPO}/v1"]


async def test_a_media_type_no_header_may_hold_is_not_sent(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]]) -> None:
    hub = await registry()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST + "\u001b[31m\u0000",
                       "config": {}, "layers": []}).encode()
    hub.fake.add_manifest("library/app", body, tag="v1", media_type="application/json")
    routes = {"docker.io": {"upstream": hub.url}}
    fast = await gateway(routes, default_route="docker.io")
    slow = await gateway(routes, default_route="docker.io", lane=False)
    answers = [await _answers(gw, [("GET", "v1"), ("GET", "v1")]) for gw in (fast, slow)]
    assert answers[0] == answers[1]
    assert [(status, h["content-type"], b) for status, h, b in answers[0]] == \
        [(200, "application/json", body)] * 2


async def test_a_client_that_takes_no_index_looks_in_the_store_each_recheck(
        registry: Callable[..., Awaitable[Served]],
        gateway: Callable[..., Awaitable[Gateway]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Its GET looks for the tag's WIDE view first (another process may have stored it);
    the lane answers only while that view is known to be absent (ABSENT_RECHECK)."""
    _hub, _digest, fast, _slow = await _pair(registry, gateway)
    written = _written(monkeypatch)
    for _ in range(3):
        assert (await fast.client.get(f"{REPO}/v1", headers=ACCEPT)).status == 200
    assert written == [f"GET {REPO}/v1"] * 2  # the MISS looked; then the view is absent
    await asyncio.sleep(1.1)  # past ABSENT_RECHECK: the store is looked at again, once
    for _ in range(2):
        assert (await fast.client.get(f"{REPO}/v1", headers=ACCEPT)).status == 200
    assert written == [f"GET {REPO}/v1"] * 3
