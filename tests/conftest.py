"""Shared fixtures: real upstream registries behind counting proxies, and the gateway
under test in front of them. Markers `integration` and `e2e` are registered in
pyproject.toml. Processes started here are stopped here, even when a test fails,
and the logs of the live ones are attached to every failing test's report.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import Gateway, run_gateway
from tests.support.inprocess import InProcessGateway, run_inprocess_gateway
from tests.support.upstreams import Upstream, run_upstream
from tests.support.world import (
    BASIC_ROUTE,
    BASIC_USERNAME_ENV,
    LISTEN_HOSTS,
    PRIVATE_PASSWORD_ENV,
    PRIVATE_ROUTE,
    World,
    world_routes,
)

# -- logs of live processes, shown when a test fails ---------------------------------------


class LiveLogs:
    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], str]] = {}

    @contextmanager
    def watching(self, name: str, read: Callable[[], str]) -> Iterator[None]:
        self._sources[name] = read
        try:
            yield
        finally:
            self._sources.pop(name, None)

    def sections(self, lines: int = 80) -> list[tuple[str, str]]:
        found = []
        for name, read in list(self._sources.items()):
            text = read().splitlines()[-lines:]
            if text:
                found.append((f"{name} (last {len(text)} lines)", "\n".join(text)))
        return found


_LIVE_LOGS = pytest.StashKey[LiveLogs]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_LIVE_LOGS] = LiveLogs()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for title, text in item.config.stash[_LIVE_LOGS].sections():
            report.sections.append((title, text))


@pytest.fixture(scope="session")
def live_logs(pytestconfig: pytest.Config) -> LiveLogs:
    return pytestconfig.stash[_LIVE_LOGS]


# -- the shared world: five upstreams and one gateway ------------------------------------


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, live_logs: LiveLogs) -> Iterator[World]:
    root = tmp_path_factory.mktemp("world")
    with ExitStack() as stack:
        hub = stack.enter_context(run_upstream(root / "hub", "docker.io"))
        ghcr = stack.enter_context(run_upstream(root / "ghcr", "ghcr.io"))
        quay = stack.enter_context(run_upstream(root / "quay", "quay.io"))
        private = stack.enter_context(run_upstream(root / "private", PRIVATE_ROUTE, auth="token"))
        basic = stack.enter_context(run_upstream(root / "basic", BASIC_ROUTE, auth="basic",
                                                 username="basic-user"))
        password_file = root / "basic-password"
        password_file.write_text(f"{basic.registry.password}\n")
        gateway = stack.enter_context(run_gateway(
            root / "gateway",
            world_routes(hub, ghcr, quay, private, basic, password_file),
            listen_hosts=LISTEN_HOSTS,
            env={PRIVATE_PASSWORD_ENV: str(private.registry.password),
                 BASIC_USERNAME_ENV: str(basic.registry.username)},
        ))
        stack.enter_context(live_logs.watching("gateway stderr (shared world)", gateway.log))
        yield World(hub, ghcr, quay, private, basic, gateway)


@pytest.fixture
def start_gateway(tmp_path: Path, live_logs: LiveLogs) -> Iterator[Callable[..., Gateway]]:
    """Factory for a gateway of the test's own (routes given as a dict); stopped at the end."""
    with ExitStack() as stack:

        def start(routes: dict[str, Any], **kwargs: Any) -> Gateway:
            name = f"gateway-{secrets.token_hex(3)}"
            gateway = stack.enter_context(run_gateway(tmp_path / name, routes, **kwargs))
            stack.enter_context(live_logs.watching(f"{name} stderr", gateway.log))
            return gateway

        yield start


@pytest.fixture
def start_inprocess_gateway(tmp_path: Path) -> Iterator[Callable[..., InProcessGateway]]:
    """Factory for a gateway in this process whose clock the test moves (`gateway.clock`):
    for tests about TTLs, which advance the clock instead of sleeping."""
    with ExitStack() as stack:

        def start(routes: dict[str, Any], **kwargs: Any) -> InProcessGateway:
            workdir = tmp_path / f"inprocess-{secrets.token_hex(3)}"
            return stack.enter_context(run_inprocess_gateway(workdir, routes, **kwargs))

        yield start


@pytest.fixture
def start_upstream(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """Factory for an upstream of the test's own (registry + counting proxy)."""
    with ExitStack() as stack:

        def start(route: str, **kwargs: Any) -> Upstream:
            workdir = tmp_path / f"upstream-{secrets.token_hex(3)}"
            return stack.enter_context(run_upstream(workdir, route, **kwargs))

        yield start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session (no proxies from the environment)."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session
