"""A client whose Accept leaves distribution nothing but signed schema1 (only the OCI
index type, or only schema1 itself): distribution converts and signs the manifest, so
its digest differs from the stored one. That is the client's choice, not a corrupt
upstream: a 4xx with an OCI body, never counted as an integrity failure (issue #8)."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import OCI_INDEX, make_image
from tests.support.pulls import assert_oci_error, fetch
from tests.support.upstreams import unique_repository
from tests.support.world import World

pytestmark = pytest.mark.integration

SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


async def integrity_failures(http: aiohttp.ClientSession, world: World) -> float:
    async with http.get(world.gateway.url() + "/metrics") as resp:
        text = await resp.text()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "gateway_integrity_failures_total"
               and sample.labels.get("kind") == "manifest")


@pytest.mark.parametrize("accept", [OCI_INDEX, SCHEMA1])
@pytest.mark.parametrize("by", ["tag", "digest"])
async def test_an_accept_that_forces_schema1_gets_a_clear_4xx(
        world: World, http: aiohttp.ClientSession, accept: str, by: str) -> None:
    repository = unique_repository()
    image = world.ghcr.push(repository, make_image())  # a Docker schema2 image
    reference = "latest" if by == "tag" else image.digest
    failures = await integrity_failures(http, world)
    fetched = await fetch(http, f"{world.gateway.url()}/v2/ghcr.io/{repository}/manifests/"
                          f"{reference}", accept=accept)
    if by == "digest" and fetched.status == 200:
        # By digest distribution serves the stored bytes whatever the Accept says.
        assert fetched.body == image.manifest.data
    else:
        assert 400 <= fetched.status < 500, fetched.describe()
        (error,) = assert_oci_error(fetched)
        assert error["code"] == "MANIFEST_UNKNOWN", error
        assert "schema1" in error["message"]
    assert await integrity_failures(http, world) == failures
    # The same image still pulls for a client that takes what it is.
    ok = await fetch(http, f"{world.gateway.url()}/v2/ghcr.io/{repository}/manifests/latest")
    assert ok.status == 200 and ok.body == image.manifest.data
