"""Docker Hub quota through the gateway (issue #11): a route with three accounts in front
of the fake registry, which checks each account's token and counts manifest GETs per
account as Docker Hub does (rate-limit headers; a 429 with them at 0).

One account out: pulls go on as the others. All out: a cached tag is served STALE, an
uncached one is a 429 with Retry-After. An abuse 429 (no rate-limit headers) is counted
apart and backs the whole upstream off instead of spending the other accounts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import Response
from tests.support.fake_registry import (
    FakeRegistry,
    RunningFake,
    fake_routes,
    image_manifest,
    run_fake_registry,
)
from tests.support.faults import rate_limited
from tests.support.images import sha256_digest
from tests.support.inprocess import InProcessGateway

NAMES = ("alice", "bob", "carol")
PASSWORDS = {name: f"pw-{name}-Zq81" for name in NAMES}
ENV = {f"HUB_{name.upper()}": password for name, password in PASSWORDS.items()}
REPO = "library/app"
LAYER = b"layer bytes " * 1000

StartGateway = Callable[..., InProcessGateway]


@pytest.fixture
def hub() -> Iterator[RunningFake]:
    fake = FakeRegistry(auth="bearer", accounts=PASSWORDS,
                        pull_limits=dict.fromkeys(NAMES, 100))
    fake.add_blob(LAYER)
    for tag in ("cached", "other", "new"):
        fake.add_manifest(REPO, image_manifest(LAYER, salt=tag), tag=tag)
    with run_fake_registry(fake) as running:
        yield running


def routes(hub: RunningFake) -> dict[str, Any]:
    return fake_routes(hub.url, tag_ttl="60s", stale_if_error="forever", credentials=[
        {"username": name, "password_env": f"HUB_{name.upper()}"} for name in NAMES])


def manifest(gateway: InProcessGateway, tag: str) -> Response:
    return gateway.client().get(f"/v2/{REPO}/manifests/{tag}")


def pulls_by_account(hub: RunningFake, tag: str) -> list[tuple[str | None, int]]:
    return [(s.account, s.status) for s in hub.fake.seen("GET", f"/v2/{REPO}/manifests/{tag}")
            if s.status != 401]


def metric(gateway: InProcessGateway, name: str) -> dict[tuple[str, ...], float]:
    """Samples of `name` by their label values other than the route."""
    text = gateway.client().get("/metrics").body.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(v for k, v in sorted(sample.labels.items()) if k != "route")] = \
                    sample.value
    return found


def test_pulls_go_on_as_the_other_accounts(hub: RunningFake,
                                           start_inprocess_gateway: StartGateway) -> None:
    hub.fake.pulls["alice"] = 100  # alice's window is spent
    gateway = start_inprocess_gateway(routes(hub), env=ENV)
    for tag in ("cached", "other", "new"):
        got = manifest(gateway, tag)
        assert (got.status, got.header("X-Cache")) == (200, "MISS")
    blob = gateway.client().get(f"/v2/{REPO}/blobs/{sha256_digest(LAYER)}")
    assert (blob.status, blob.body) == (200, LAYER)
    assert pulls_by_account(hub, "cached") == [("alice", 429), ("bob", 200)]
    assert pulls_by_account(hub, "other") == [("carol", 200)]
    assert pulls_by_account(hub, "new") == [("bob", 200)]
    # The layer went as the account whose token the manifest used.
    (blob_get,) = hub.fake.blob_requests(REPO, digest=sha256_digest(LAYER))
    assert blob_get.account == "bob"
    remaining = metric(gateway, "gateway_upstream_ratelimit_remaining")
    assert remaining == {("alice",): 0, ("bob",): 98, ("carol",): 99}
    assert metric(gateway, "gateway_upstream_rate_limited_total") == {
        ("alice", "pull_limit"): 1}


def test_all_accounts_out_serves_cached_tags_stale(
        hub: RunningFake, start_inprocess_gateway: StartGateway) -> None:
    gateway = start_inprocess_gateway(routes(hub), env=ENV)
    cached = manifest(gateway, "cached")
    assert cached.status == 200
    # Every window is spent, and the tag moved upstream (so only a GET could refresh it).
    for name in NAMES:
        hub.fake.pulls[name] = 100
    hub.fake.add_manifest(REPO, image_manifest(LAYER, salt="moved"), tag="cached")
    gateway.clock.advance(61)

    stale = manifest(gateway, "cached")
    assert (stale.status, stale.header("X-Cache"), stale.body) == (200, "STALE", cached.body)
    refused = manifest(gateway, "new")
    assert refused.status == 429
    assert refused.header("Retry-After") == "21600"
    assert json.loads(refused.body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    # Each account was asked once; after that none is asked until a window resets.
    assert sorted(a for a, status in pulls_by_account(hub, "cached") if status == 429) == \
        sorted(NAMES)
    assert pulls_by_account(hub, "new") == []
    assert metric(gateway, "gateway_upstream_ratelimit_remaining") == dict.fromkeys(
        [(name,) for name in NAMES], 0)
    # A window resets: pulls go out again.
    hub.fake.reset_pulls()
    gateway.clock.advance(21600)
    assert manifest(gateway, "new").status == 200


def test_abuse_429_is_counted_apart_and_backs_the_upstream_off(
        hub: RunningFake, start_inprocess_gateway: StartGateway) -> None:
    gateway = start_inprocess_gateway(routes(hub), env=ENV)
    cached = manifest(gateway, "cached")
    hub.fake.add_manifest(REPO, image_manifest(LAYER, salt="moved"), tag="cached")
    hub.fake.queue("GET", f"/v2/{REPO}/manifests/cached", rate_limited(retry_after="120"))
    gateway.clock.advance(61)
    stale = manifest(gateway, "cached")
    assert (stale.status, stale.header("X-Cache"), stale.body) == (200, "STALE", cached.body)
    # Not spread over the other accounts: one 429, then nothing reaches the upstream.
    asked = len(hub.fake.requests)
    refused = manifest(gateway, "new")
    assert (refused.status, refused.header("Retry-After")) == (429, "120")
    assert len(hub.fake.requests) == asked
    counted = metric(gateway, "gateway_upstream_rate_limited_total")
    assert list(counted.values()) == [1] and next(iter(counted))[1] == "abuse"
    gateway.clock.advance(120)
    assert manifest(gateway, "new").status == 200


def test_no_password_in_metrics(hub: RunningFake,
                                start_inprocess_gateway: StartGateway) -> None:
    hub.fake.pulls["alice"] = 100
    gateway = start_inprocess_gateway(routes(hub), env=ENV)
    manifest(gateway, "cached")
    text = gateway.client().get("/metrics").body.decode()
    assert 'account="alice"' in text
    for password in PASSWORDS.values():
        assert password not in text
