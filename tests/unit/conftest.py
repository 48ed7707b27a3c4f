"""Fixtures for unit tests: fake registries (tests/support/fake_registry.py) on 127.0.0.1
and the gateway app in process.

Every server started here is closed by the fixture that started it, even on failure.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from gateway import api
from gateway.cache import Cache, FsStore, MemoryIndex, ProcessDir, SqliteContents
from gateway.cache.coordinate import Coordinator
from gateway.config import CachePolicy, Config, Route, UpstreamSettings, load_config
from gateway.metrics import Metrics
from gateway.server import MAX_LINE, METRICS, create_app
from gateway.upstream import Upstream
from tests.support.clock import Clock
from tests.support.fake_registry import FakeRegistry
from tests.support.served import GatewayTestServer


@dataclass
class Served:
    """A fake registry and the URL the gateway reaches it at."""

    fake: FakeRegistry
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def stop(self) -> None:
        await self.server.close()


@pytest.fixture
async def registry(aiohttp_server: Any) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Factory: `await registry(auth="bearer", ...)` → a running FakeRegistry."""
    fakes: list[FakeRegistry] = []

    async def start(**kwargs: Any) -> Served:
        fake = FakeRegistry(**kwargs)
        fakes.append(fake)
        server = await aiohttp_server(fake.app)
        return Served(fake, server)

    yield start
    for fake in fakes:
        fake.release()  # responses stalled at the gate end before the servers close


def make_route(url: str, name: str = "fake.test", **overrides: Any) -> Route:
    """A route to `url`; keyword arguments go to the upstream settings, the cache policy
    or the route itself, by name."""
    parts: dict[type, dict[str, Any]] = {UpstreamSettings: {}, CachePolicy: {}}
    for cls, values in parts.items():
        names = {f.name for f in fields(cls)}
        values.update({k: overrides.pop(k) for k in list(overrides) if k in names})
    return Route(name=name, namespace=name,
                 upstream=UpstreamSettings(URL(url), **parts[UpstreamSettings]),
                 cache=CachePolicy(**parts[CachePolicy]), **overrides)


def make_cache(route: Route, data_dir: Path, metrics: Metrics, clock: Clock, *,
               store: FsStore | None = None, store_type: type[FsStore] = FsStore,
               coordinator: Coordinator | None = None) -> Cache:
    """The real cache of one route over a filesystem store in `data_dir` (open it);
    with a `coordinator`, as a worker among others on that directory."""
    spool = ProcessDir(data_dir / ".spool")
    store = store if store is not None else store_type(data_dir, spool.path)
    return Cache(Config(routes=(route,)), data_dir, store, MemoryIndex(clock),
                 SqliteContents(data_dir, clock=clock), metrics, spool, clock,
                 coordinator=coordinator)


@pytest.fixture
async def upstream_for() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    """Factory: an started `Upstream` client for a route; closed at teardown."""
    started: list[Upstream] = []

    async def start(route: Route, *, metrics: Metrics | None = None,
                    read_timeout: float = 10.0, clock: Clock | None = None) -> Upstream:
        upstream = Upstream(route, metrics or Metrics(), read_timeout=read_timeout,
                            clock=clock or Clock())
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    app: web.Application
    config: Config
    data_dir: Path

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    @property
    def services(self) -> api.Services:
        return self.app[api.SERVICES]

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


_counter = itertools.count()


def config_text(routes: dict[str, Any], **top: Any) -> str:
    doc: dict[str, Any] = {"base_domains": ["example.com"], **top, "routes": routes}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Factory: `await gateway({"docker.io": {"upstream": url}}, default_route=...)`.

    Serves `create_app(config, data_dir)` on 127.0.0.1 as `serve` does (its runner and
    registry lane, the header limits the CLI uses), and closes it (and its cache tasks)
    at teardown.
    """
    clients: list[TestClient[Any, Any]] = []

    async def start(routes: dict[str, Any], *, env: dict[str, str] | None = None,
                    data_dir: Path | None = None, lane: bool = True, **top: Any) -> Gateway:
        config = load_config(config_text(routes, **top), "routes.yaml", env=env or {})
        data = data_dir or tmp_path / f"data-{next(_counter)}"
        app = create_app(config, data)
        # lane=False: aiohttp's own runner, so every request takes the router's path.
        server = GatewayTestServer(app) if lane else TestServer(app)
        await server.start_server(max_line_size=MAX_LINE, max_field_size=MAX_LINE)
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return Gateway(client, app, config, data)

    yield start
    for client in clients:
        await client.close()
