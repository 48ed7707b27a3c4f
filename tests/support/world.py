"""The shared test world: upstreams by route, the routes.yaml that serves them, and the
addresses and names the tests use to reach each route."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gateway import Gateway
from .upstreams import Upstream

# The gateway listens on the same port on each of these; Host routing by exact host uses
# the address the client connected to.
LISTEN_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
HUB_HOST = "127.0.0.2"  # an exact host of the docker.io route
GHCR_HOST = "127.0.0.3"  # an exact host of the ghcr.io route
BASE_DOMAIN = "gw.test"  # ghcr.gw.test routes by label (sent as a Host header only)
PRIVATE_ROUTE = "private.registry.test"
BASIC_ROUTE = "basic.registry.test"
PRIVATE_PASSWORD_ENV = "RGW_TEST_PRIVATE_PASSWORD"
BASIC_USERNAME_ENV = "RGW_TEST_BASIC_USERNAME"


@dataclass
class World:
    """Upstreams by route key, and the gateway that serves all of them."""

    hub: Upstream  # docker.io (also the default route)
    ghcr: Upstream  # ghcr.io
    quay: Upstream  # quay.io: same repository names as ghcr, different bytes
    private: Upstream  # token auth, credentials via password_env
    basic: Upstream  # htpasswd auth, credentials via username_env + password_file
    gateway: Gateway

    @property
    def upstreams(self) -> list[Upstream]:
        return [self.hub, self.ghcr, self.quay, self.private, self.basic]

    def upstream_request_count(self) -> int:
        return sum(len(u.proxy.seen()) for u in self.upstreams)


def world_routes(hub: Upstream, ghcr: Upstream, quay: Upstream, private: Upstream,
                 basic: Upstream, basic_password_file: Path) -> dict[str, Any]:
    return {
        "base_domains": [BASE_DOMAIN],
        "default_route": "docker.io",
        "routes": {
            "docker.io": {"upstream": hub.url, "hosts": [HUB_HOST]},
            "ghcr.io": {"upstream": ghcr.url, "hosts": [GHCR_HOST]},
            "quay.io": {"upstream": quay.url},
            PRIVATE_ROUTE: {
                "upstream": private.url,
                "credentials": {"username": private.registry.username,
                                "password_env": PRIVATE_PASSWORD_ENV},
            },
            BASIC_ROUTE: {
                "upstream": basic.url,
                "credentials": {"username_env": BASIC_USERNAME_ENV,
                                "password_file": str(basic_password_file)},
            },
        },
    }


