"""The `/_gateway/routes` listing (gateway/wire.py): today's JSON shape both ways, and a
document that is not a listing refused with an error that names the key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.wire import GATEWAY, GatewayListing, RouteListing

LISTING = GatewayListing(
    routes=(RouteListing("docker.io", "hub", ("hub-mirror.corp.test",),
                         ("registry-1.docker.io", "index.docker.io")),
            RouteListing("ghcr.io", "ghcr"),
            RouteListing("private.registry.test:5000", None, ("private.gw.test",))),
    base_domains=("gw.test", "gw.example"), default_route="docker.io", version="0.1.0")

# What gateway/server.py answered at dca8539, key for key: clients of any version read it.
DOCUMENT: dict[str, Any] = {
    "gateway": "registry-gateway", "version": "0.1.0",
    "base_domains": ["gw.test", "gw.example"], "default_route": "docker.io",
    "routes": [
        {"name": "docker.io", "label": "hub", "hosts": ["hub-mirror.corp.test"],
         "aliases": ["registry-1.docker.io", "index.docker.io"]},
        {"name": "ghcr.io", "label": "ghcr", "hosts": [], "aliases": []},
        {"name": "private.registry.test:5000", "label": None, "hosts": ["private.gw.test"],
         "aliases": []},
    ]}


def test_the_listing_is_todays_json_both_ways() -> None:
    assert LISTING.to_json() == DOCUMENT
    assert list(LISTING.to_json()) == list(DOCUMENT)  # same key order as before
    assert GatewayListing.from_json(json.loads(json.dumps(DOCUMENT))) == LISTING
    assert GatewayListing.from_json(LISTING.to_json()) == LISTING
    assert LISTING.route("ghcr.io") == RouteListing("ghcr.io", "ghcr")
    assert LISTING.route("quay.io") is None


def test_reading_is_lenient_where_it_is_safe() -> None:
    """Keys a newer gateway adds are ignored; absent optional keys take their defaults;
    names compare case-insensitively, so they are read in lower case."""
    listing = GatewayListing.from_json({
        "routes": [{"name": "GHCR.io", "hosts": ["Mirror.GW.test"], "new_field": 1}],
        "base_domains": ["GW.Test"], "something_new": {"x": 1}})
    assert listing == GatewayListing((RouteListing("ghcr.io", None, ("mirror.gw.test",)),),
                                     ("gw.test",), None, "", GATEWAY)
    assert GatewayListing.from_json({"routes": [{"name": "a.test", "label": ""}]}).routes == (
        RouteListing("a.test"),)


@pytest.mark.parametrize(("document", "message"), [
    ([], "the listing: want a JSON object, got a list"),
    ("routes", "the listing: want a JSON object, got a string 'routes'"),
    ({"errors": [{"code": "NOT_FOUND"}]}, "routes: missing"),
    ({"gateway": "something-else", "routes": []}, "gateway: 'something-else' is not"),
    ({"routes": {"docker.io": {}}}, "routes: want a list of routes, got an object"),
    ({"routes": ["docker.io"]}, r"routes\[0\]: want a JSON object, got a string 'docker.io'"),
    ({"routes": [{"label": "hub"}]}, r"routes\[0\]\.name: missing"),
    ({"routes": [{"name": 5}]}, r"routes\[0\]\.name: want a string or null, got a number 5"),
    ({"routes": [{"name": "a.test", "hosts": "h.test"}]},
     r"routes\[0\]\.hosts: want a list of host names, got a string 'h.test'"),
    ({"routes": [{"name": "a.test", "aliases": [1]}]}, r"routes\[0\]\.aliases: want a list"),
    ({"routes": [{"name": "a.test", "label": True}]}, r"routes\[0\]\.label: want a string"),
    ({"routes": [{"name": "a.test"}, {"name": "A.test"}]}, "a route name is listed twice"),
    ({"routes": [{"name": "a.test"}], "default_route": "b.test"},
     "default_route: 'b.test' is not one of the routes"),
    ({"routes": [], "base_domains": "gw.test"}, "base_domains: want a list of host names"),
    ({"routes": [], "version": 1}, "version: want a string or null, got a number 1"),
])
def test_a_document_that_is_not_a_listing_is_refused_saying_where(document: Any,
                                                                  message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayListing.from_json(document)


def test_an_error_never_repeats_a_long_value() -> None:
    with pytest.raises(ValueError) as caught:
        GatewayListing.from_json({"routes": [{"name": "a.test", "hosts": "x" * 10_000}]})
    assert len(str(caught.value)) < 120
