"""Live reload of routes.yaml (gateway/reload/, upstream_pool.py, pipeline/snapshot.py):
the holder and its hooks, the per-request snapshot, upstream clients kept or closed after
draining, the file watcher, and the whole gateway reloading in process over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import cli
from gateway.config import Config, Route, load_config_file
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.pipeline import PerConfig, build
from gateway.reload import Live, check_file
from gateway.reload.watch import changed, signatures
from gateway.server import MAX_LINE, METRICS, RELOADER, create_app
from gateway.state import STATE
from gateway.upstream import Upstream
from gateway.upstream_pool import UpstreamPool
from tests.support.fake_registry import image_manifest, stream_in_parts
from tests.support.images import OCI_MANIFEST
from tests.support.images import sha256_digest as digest_of
from tests.support.served import GatewayTestServer
from tests.support.wait import wait_until

from .conftest import Served, make_route

MiB = 1 << 20


def config_of(*routes: Route, **top: Any) -> Config:
    return Config(routes=routes, **top)


# ------------------------------------------------------------------ the holder


async def test_live_swaps_the_whole_config_and_calls_every_hook() -> None:
    first, second = config_of(make_route("http://127.0.0.1:1")), config_of()
    live = Live(first)
    seen: list[tuple[Config, Config]] = []
    checked: list[Config] = []

    async def check(config: Config) -> None:
        checked.append(config)

    def broken(_old: Config, _new: Config) -> None:
        raise RuntimeError("a broken hook")

    live.check_before_swap(check)
    live.subscribe(broken)
    live.subscribe(lambda old, new: seen.append((old, new)))
    live.watch_files(lambda config: [Path("/a"), Path("/b")] if config is first else [])
    assert live() is first and live.files(first) == [Path("/a"), Path("/b")]
    await live.check(second)
    assert live() is first and checked == [second]  # a check does not swap
    assert live.swap(second) is first
    assert live() is second and live.generation == 1
    assert seen == [(first, second)]  # the broken hook did not stop the next one


async def test_a_request_keeps_the_config_it_started_with(
        aiohttp_client: Any
) -> None:
    first, second = config_of(), config_of()
    live = Live(first)
    seen: list[tuple[Config, Config]] = []

    async def handler(request: web.Request) -> web.Response:
        before = request[STATE].config
        if live() is first:
            live.swap(second)  # a reload lands while the request is under way
        seen.append((before, request[STATE].config))
        return web.Response(text="ok")

    app = web.Application(middlewares=build(live, Metrics()).middlewares)
    app.router.add_get("/healthz", handler)
    client = await aiohttp_client(app)
    for _ in range(2):
        assert (await client.get("/healthz")).status == 200
    assert seen == [(first, first), (second, second)]  # the next request has the new one


def test_per_config_compiles_once_per_config_and_keeps_the_last_two() -> None:
    first, second = config_of(), config_of()
    compiled: list[Config] = []
    routers = PerConfig(lambda config: compiled.append(config) or len(compiled))
    assert routers.of(first) == 1 and routers.of(first) == 1
    assert routers.of(second) == 2
    assert routers.of(first) == 1 and routers.of(second) == 2  # interleaved: no recompile
    assert compiled == [first, second]


# ------------------------------------------------------------------ upstream clients


class Recording(Upstream):
    """An upstream client that notes when it is closed (and opens no session)."""

    def __init__(self, route: Route) -> None:
        super().__init__(route, Metrics())
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True


def recording_pool() -> tuple[UpstreamPool, list[Recording]]:
    made: list[Recording] = []

    def make(route: Route) -> Upstream:
        made.append(Recording(route))
        return made[-1]

    return UpstreamPool(make), made


async def test_an_unchanged_route_keeps_its_client_a_changed_one_closes_after_draining() -> None:
    pool, made = recording_pool()
    hub, ghcr = make_route("http://127.0.0.1:1", "docker.io"), make_route("http://127.0.0.1:2",
                                                                         "ghcr.io")
    await pool.start([hub, ghcr])
    async with pool.use(hub) as hub_client, pool.use(ghcr) as ghcr_client:
        # A reload: docker.io as it was (an equal value, another object), ghcr.io changed.
        ghcr2 = replace(ghcr, cache=replace(ghcr.cache, tag_ttl=5.0))
        pool.commit(await pool.prepare([replace(hub), ghcr2]))
        assert len(made) == 3 and made[2].started and not made[2].closed
        async with pool.use(replace(hub)) as again:
            assert again is hub_client
        async with pool.use(ghcr2) as new:
            assert new is made[2]
        async with pool.use(ghcr) as old:  # a request of the old config still gets its own
            assert old is ghcr_client
        await asyncio.sleep(0.01)
        assert not ghcr_client.closed  # in use: never cut
    await wait_until(lambda: ghcr_client.closed, what="the replaced client to close")
    assert not hub_client.closed and not made[2].closed and len(pool) == 2
    await pool.close()
    assert all(u.closed for u in made)


async def test_a_flight_holds_a_replaced_client_after_its_request_ended() -> None:
    pool, _made = recording_pool()
    route = make_route("http://127.0.0.1:1", "docker.io")
    await pool.start([route])
    async with pool.use(route) as client:
        flight = client.in_use()  # what a blob flight does before its request ends
        flight.__enter__()
    pool.commit(await pool.prepare([replace(route, hosts=("x.example.com",))]))
    await asyncio.sleep(0.01)
    assert not client.closed
    flight.__exit__(None, None, None)
    await wait_until(lambda: client.closed, what="the client to close once the flight ended")
    await pool.close()


async def test_a_request_of_an_older_config_after_its_client_closed_gets_one_of_its_own() -> None:
    pool, made = recording_pool()
    route = make_route("http://127.0.0.1:1", "docker.io")
    await pool.start([route])
    pool.commit(await pool.prepare([replace(route, hosts=("x.example.com",))]))
    await wait_until(lambda: made[0].closed, what="the idle replaced client to close")
    async with pool.use(route) as late:
        assert late is not made[0] and late.route == route and late.started
    await wait_until(lambda: late.closed, what="the late client to close after its use")
    assert len(pool) == 1
    await pool.close()


async def test_a_refused_reload_closes_what_it_started() -> None:
    pool, made = recording_pool()
    route = make_route("http://127.0.0.1:1", "docker.io")
    await pool.start([route])
    staged = await pool.prepare([route, make_route("http://127.0.0.1:2", "ghcr.io")])
    await pool.discard(staged)
    assert [u.closed for u in made] == [False, True]
    await pool.close()


# ------------------------------------------------------------------ the file watcher


def test_the_watcher_sees_writes_in_place_renames_and_ignores_a_missing_moment(
        tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("a: 1\n")
    seen = signatures([path])
    assert changed(seen, signatures([path])) == []
    with path.open("a") as file:
        file.write("b: 2\n")  # in place: size and mtime
    assert changed(seen, signatures([path])) == [path]
    seen = signatures([path])
    new = tmp_path / "routes.yaml.tmp"
    new.write_text("a: 1\nb: 2\n")  # same size, maybe the same mtime: a new inode
    os.replace(new, path)
    assert changed(seen, signatures([path])) == [path]
    seen = signatures([path])
    path.unlink()  # an editor's "rename the old away" moment: not a change
    assert changed(seen, signatures([path])) == []


# ------------------------------------------------------------------ the gateway


@dataclass
class LiveGateway:
    client: TestClient[Any, Any]
    app: web.Application
    path: Path

    def write(self, document: dict[str, Any], *, atomic: bool = True) -> None:
        text = yaml.safe_dump(document, sort_keys=False)
        if atomic:
            new = self.path.with_suffix(".new")
            new.write_text(text)
            os.replace(new, self.path)
        else:
            self.path.write_text(text)

    async def reload(self) -> bool:
        return await self.app[RELOADER].reload("test")

    def sample(self, name: str, **labels: str) -> float:
        value = self.app[METRICS].registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def routes(self) -> list[str]:
        resp = await self.client.get("/_gateway/routes")
        assert resp.status == 200
        return [r["name"] for r in (await resp.json())["routes"]]


@pytest.fixture
async def live_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LiveGateway]]]:
    clients: list[TestClient[Any, Any]] = []

    async def start(document: dict[str, Any], *, poll: float = 0.0) -> LiveGateway:
        path = tmp_path / f"routes-{len(clients)}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        app = create_app(load_config_file(path), tmp_path / f"data-{len(clients)}",
                         config_file=path, watch_interval=poll)
        server = GatewayTestServer(app)
        await server.start_server(max_line_size=MAX_LINE, max_field_size=MAX_LINE)
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return LiveGateway(client, app, path)

    yield start
    for client in clients:
        await client.close()


def routes_doc(**routes: str) -> dict[str, Any]:
    return {"default_route": next(iter(routes)),
            "routes": {name: {"upstream": url} for name, url in routes.items()}}


async def test_a_reload_adds_a_route_that_serves_and_keeps_the_old_ones_client(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]]) -> None:
    hub, ghcr = await registry(auth="bearer"), await registry()
    body = image_manifest(b"layer")
    hub.fake.add_manifest("library/alpine", body, tag="3")
    ghcr.fake.add_manifest("owner/img", body, tag="1")
    gw = await live_gateway(routes_doc(**{"docker.io": hub.url}))
    assert (await gw.client.get("/v2/library/alpine/manifests/3")).status == 200
    assert await gw.routes() == ["docker.io"]
    gw.write(routes_doc(**{"docker.io": hub.url, "ghcr.io": ghcr.url}))
    assert await gw.reload()
    assert await gw.routes() == ["docker.io", "ghcr.io"]
    resp = await gw.client.get("/v2/ghcr.io/owner/img/manifests/1")
    assert resp.status == 200 and await resp.read() == body
    tokens = len(hub.fake.token_requests)
    resp = await gw.client.get("/v2/library/alpine/manifests/latest-missing")
    assert resp.status == 404
    assert len(hub.fake.token_requests) == tokens  # the same client: its token is kept
    assert gw.sample("gateway_config_reloads_total", result="ok") == 1


async def test_an_invalid_file_is_refused_whole_and_reported(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]],
        caplog: pytest.LogCaptureFixture) -> None:
    hub = await registry()
    gw = await live_gateway(routes_doc(**{"docker.io": hub.url}))
    gw.path.write_text(f"routes:\n  docker.io:\n    upstream: {hub.url}\n  ghcr.io:\n"
                       "    upstream: http://127.0.0.1:1\n    tag_ttl: soon\n")
    with caplog.at_level(logging.ERROR, "gateway.reload"):
        assert not await gw.reload()
    assert f"{gw.path}:6: routes.ghcr.io.tag_ttl" in caplog.text
    assert "the running config stays" in caplog.text
    assert await gw.routes() == ["docker.io"]
    assert gw.sample("gateway_config_reloads_total", result="error") == 1
    assert gw.sample("gateway_config_last_reload_successful") == 0
    ok, text = check_file(gw.path)
    assert not ok and f"{gw.path}:6: routes.ghcr.io.tag_ttl" in text
    gw.write(routes_doc(**{"docker.io": hub.url, "quay.io": hub.url}))
    assert await gw.reload()
    assert await gw.routes() == ["docker.io", "quay.io"]
    assert gw.sample("gateway_config_last_reload_successful") == 1


async def test_unresolvable_secrets_refuse_the_file(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = await registry()
    gw = await live_gateway(routes_doc(**{"docker.io": hub.url}))
    monkeypatch.delenv("RGW_RELOAD_UNSET", raising=False)
    doc = routes_doc(**{"docker.io": hub.url})
    doc["routes"]["docker.io"]["credentials"] = {"username": "u",
                                                 "password_env": "RGW_RELOAD_UNSET"}
    gw.write(doc)
    with caplog.at_level(logging.ERROR, "gateway.reload"):
        assert not await gw.reload()
    assert "routes.docker.io.credentials.password_env" in caplog.text
    assert "RGW_RELOAD_UNSET is not set" in caplog.text


async def test_a_changed_file_is_picked_up_without_a_signal(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]]) -> None:
    hub = await registry()
    gw = await live_gateway(routes_doc(**{"docker.io": hub.url}), poll=0.05)
    gw.write(routes_doc(**{"docker.io": hub.url, "ghcr.io": hub.url}))  # by rename
    await wait_until(lambda: gw.sample("gateway_config_reloads_total", result="ok") == 1,
                     what="a reload after the rename", timeout=10)
    assert await gw.routes() == ["docker.io", "ghcr.io"]
    gw.write(routes_doc(**{"ghcr.io": hub.url}), atomic=False)  # in place
    await wait_until(lambda: gw.sample("gateway_config_reloads_total", result="ok") == 2,
                     what="a reload after the write in place", timeout=10)
    assert await gw.routes() == ["ghcr.io"]
    await asyncio.sleep(0.3)  # nothing changed since: no more reloads
    assert gw.sample("gateway_config_reloads_total", result="ok") == 2


async def test_a_reload_during_a_long_blob_transfer_does_not_cut_it(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]]) -> None:
    old, new = await registry(), await registry()
    data = os.urandom(4 * MiB)
    digest = old.fake.add_blob(data)
    new.fake.add_blob(data)
    path = f"/v2/library/big/blobs/{digest}"
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_parts(request, [data[:MiB], data[MiB:]], gates=[None, gate],
                                     content_length=len(data))

    old.fake.override("GET", path, slow)
    gw = await live_gateway(routes_doc(**{"docker.io": old.url}))
    pull = asyncio.create_task(gw.client.get(path))
    await wait_until(lambda: old.fake.count("GET", path) == 1, what="the transfer to begin")
    gw.write(routes_doc(**{"docker.io": new.url}))  # the route now names another upstream
    assert await gw.reload()
    gate.set()
    resp = await pull
    assert resp.status == 200 and await resp.read() == data
    assert new.fake.count("GET", path) == 0
    other = new.fake.add_blob(b"after the reload")
    resp = await gw.client.get(f"/v2/library/big/blobs/{other}")
    assert resp.status == 200 and new.fake.count("GET", f"/v2/library/big/blobs/{other}") == 1


async def test_pins_are_fetched_again_after_a_reload(
        registry: Callable[..., Awaitable[Served]],
        live_gateway: Callable[..., Awaitable[LiveGateway]]) -> None:
    hub = await registry()
    config = b'{"architecture":"amd64","os":"linux"}'
    hub.fake.add_blob(config)
    layer = os.urandom(1000)
    hub.fake.add_blob(layer)
    body = image_manifest(layer, config=config)
    hub.fake.add_manifest("library/pause", body, tag="3.9", media_type=OCI_MANIFEST)
    doc = routes_doc(**{"docker.io": hub.url})
    gw = await live_gateway(doc)
    assert hub.fake.count("GET", "/v2/library/pause/manifests/3.10") == 0
    hub.fake.add_manifest("library/pause", image_manifest(layer, config=config, salt="10"),
                          tag="3.10")
    gw.write({**doc, "pins": ["docker.io/library/pause:3.10"]})
    assert await gw.reload()
    await wait_until(lambda: hub.fake.count("GET", f"/v2/library/pause/blobs/{digest_of(layer)}")
                     == 1, what="the newly pinned image to be fetched")
    assert hub.fake.count("GET", "/v2/library/pause/manifests/3.10") == 1
    await wait_until(lambda: gw.sample("gateway_pinned_bytes", route="docker.io") > 1000,
                     what="the pinned bytes to be counted")


def test_check_prints_ok_or_the_error_with_its_exit_status(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes:\n  docker.io: {}\n")
    assert cli.main(["check", "--config", str(path)]) == 0
    assert f"OK: {path} is valid" in capsys.readouterr().out
    path.write_text("routes:\n  docker.io:\n    label: -no-\n")
    assert cli.main(["check", "--config", str(path)]) == 1
    assert f"{path}:3: routes.docker.io.label" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        load_config_file(path)
