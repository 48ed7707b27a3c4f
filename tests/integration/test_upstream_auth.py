"""Upstreams that require authentication: Bearer tokens (the Docker Hub dance, password
from `password_env`) and htpasswd Basic (username from `username_env`, password from
`password_file`). The gateway must pull with the configured credentials and never
write the secret to its log."""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.images import make_image
from tests.support.pulls import pull_image
from tests.support.upstreams import unique_repository
from tests.support.world import BASIC_ROUTE, PRIVATE_ROUTE, World

pytestmark = pytest.mark.integration


def test_upstreams_really_require_credentials(world: World) -> None:
    """Control: without credentials both upstreams refuse, so a pull proves the gateway's."""
    repository = unique_repository()
    world.private.push(repository, make_image(layer_sizes=(1024,)))
    world.basic.push(repository, make_image(layer_sizes=(1024,)))
    for upstream in (world.private, world.basic):
        anonymous = upstream.registry.client(authenticated=False)
        response = anonymous.get(f"/v2/{repository}/manifests/latest", repository=repository)
        assert response.status == 401, (upstream.route, response.status)


@pytest.mark.parametrize("by", ["path-prefix", "ns"])
async def test_pull_from_token_auth_upstream(
    world: World, http: aiohttp.ClientSession, by: str
) -> None:
    repository = unique_repository()
    image = world.private.push(repository, make_image())
    tokens = world.private.registry.auth.tokens  # type: ignore[union-attr]
    asked_before = len(tokens.recorded())

    if by == "path-prefix":
        result = await pull_image(http, world.gateway.url(), f"{PRIVATE_ROUTE}/{repository}",
                                  "latest", image)
    else:
        result = await pull_image(http, world.gateway.url(), repository, "latest", image,
                                  params={"ns": PRIVATE_ROUTE})

    assert result.route == {PRIVATE_ROUTE}
    asked = tokens.recorded()[asked_before:]
    assert asked, "the gateway never asked the token server"
    assert all(r.account == world.private.registry.username and r.granted for r in asked), asked
    assert any(f"repository:{repository}:pull" in r.scopes for r in asked), asked
    assert str(world.private.registry.password) not in world.gateway.log()


async def test_pull_from_basic_auth_upstream(world: World, http: aiohttp.ClientSession) -> None:
    repository = unique_repository()
    image = world.basic.push(repository, make_image())

    result = await pull_image(http, world.gateway.url(), f"{BASIC_ROUTE}/{repository}",
                              "latest", image)

    assert result.route == {BASIC_ROUTE}
    assert world.basic.proxy.blob_requests(repository)
    assert str(world.basic.registry.password) not in world.gateway.log()
