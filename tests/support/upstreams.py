"""An upstream as the gateway sees it: a real registry process behind a counting proxy.

The gateway's route points at the proxy, the test seeds the registry directly (so
seeding never shows up in the proxy's counts), and can stop either one.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .images import Image, Index, push_image, push_index
from .proxy import CountingProxy
from .registry import BasicAuth, RegistryProcess, run_registry, run_token_registry

AuthKind = Literal["open", "basic", "token"]


@dataclass
class Upstream:
    route: str  # the routes.yaml key that serves this upstream
    registry: RegistryProcess
    proxy: CountingProxy

    @property
    def url(self) -> str:
        """What the gateway's route points at: the counting proxy."""
        return self.proxy.url

    def push(self, repository: str, image: Image, *, tags: tuple[str, ...] = ("latest",)) -> Image:
        return push_image(self.registry.client(), repository, image, tags=tags)

    def push_index(self, repository: str, index: Index,
                   *, tags: tuple[str, ...] = ("latest",)) -> Index:
        return push_index(self.registry.client(), repository, index, tags=tags)

    def stop(self) -> None:
        """Take the upstream away completely: connections to it are refused."""
        self.proxy.stop()
        self.registry.stop()


@contextmanager
def run_upstream(workdir: Path, route: str, *, auth: AuthKind = "open",
                 username: str = "tester", password: str | None = None) -> Iterator[Upstream]:
    password = password or secrets.token_urlsafe(16)
    with ExitStack() as stack:
        if auth == "token":
            registry = stack.enter_context(
                run_token_registry(workdir, username=username, password=password, name=route))
        elif auth == "basic":
            registry = stack.enter_context(
                run_registry(workdir, auth=BasicAuth(username, password), name=route))
        else:
            registry = stack.enter_context(run_registry(workdir, name=route))
        proxy = CountingProxy(registry.url)
        proxy.start()
        stack.callback(proxy.stop)
        yield Upstream(route, registry, proxy)


def route_entry(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"upstream": upstream.url, **extra}


def unique_repository(prefix: str = "owner") -> str:
    """A repository name no other test uses, so per-path counts belong to one test."""
    return f"{prefix}/img-{secrets.token_hex(5)}"
