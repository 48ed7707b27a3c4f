"""The gateway in this test process, on a loopback port, with a clock the test moves.

For tests about time (tag TTLs, stale-if-error windows, negative caching, token
lifetimes): instead of sleeping past a TTL, the test advances the clock. Everything
else is the real gateway app (`create_app`) against real upstream processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import load_config
from gateway.server import create_app

from .client import RegistryClient
from .clock import Clock
from .gateway import check_loopback_routes
from .threaded import ThreadedServer


@dataclass
class InProcessGateway:
    server: ThreadedServer
    clock: Clock
    data_dir: Path

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}"

    def address(self, host: str | None = None) -> str:
        return f"{host or self.host}:{self.port}"

    def client(self, *, host: str | None = None,
               host_header: str | None = None) -> RegistryClient:
        return RegistryClient(host or self.host, self.port, host_header=host_header)


@contextmanager
def run_inprocess_gateway(workdir: Path, routes: dict[str, Any], *,
                          clock: Clock | None = None,
                          env: dict[str, str] | None = None) -> Iterator[InProcessGateway]:
    check_loopback_routes(routes)
    workdir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(routes, sort_keys=False)
    (workdir / "routes.yaml").write_text(text)
    config = load_config(text, str(workdir / "routes.yaml"), env=env or {})
    clock = clock or Clock()
    data_dir = workdir / "data"
    server = ThreadedServer(lambda: create_app(config, data_dir, clock=clock))
    server.start()
    try:
        yield InProcessGateway(server, clock, data_dir)
    finally:
        server.stop()
