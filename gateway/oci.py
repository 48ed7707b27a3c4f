"""OCI and Docker media types and the manifest content negotiation rules.

Shared by the cache and the upstream client; pure values and functions, no I/O and
no imports from the rest of the gateway.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# Signed schema1 (distribution converts to it when the client's Accept leaves no other
# choice). Docker Hub stopped serving it; the gateway does not serve it either.
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+prettyjws",
                 "application/vnd.docker.distribution.manifest.v1+json")
OCTET_STREAM = "application/octet-stream"
MANIFEST_MAX = 4 << 20  # distribution's limit on a manifest's size
# type/subtype as RFC 6838 names them (restricted-name): what may be sent as Content-Type.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
                         r"/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")


def served_type(header: str, document: object) -> str:
    """The Content-Type a fetched manifest is served with: the upstream's when it names
    a manifest type; else the document's own `mediaType` when that is a well-formed media
    type (a JSON string may hold any character, a header value may not); else the
    upstream's; else application/json."""
    if header not in MANIFEST_TYPES and isinstance(document, dict):
        named = document.get("mediaType")
        if isinstance(named, str) and _MEDIA_TYPE.fullmatch(named):
            return named
    return header or "application/json"


@functools.lru_cache(maxsize=512)
def media_types(accept: str | None) -> frozenset[str]:
    """The media types an Accept header names, parameters dropped. Memoised: clients send
    the same few Accept headers on every request."""
    if not accept:
        return frozenset()
    return frozenset({part.split(";", 1)[0].strip() for part in accept.split(",")} - {""})


@functools.lru_cache(maxsize=512)
def manifest_accept(client_accept: str | None) -> str:
    """The Accept to send upstream: the client's manifest types, or all we know.

    `*/*` or no Accept must not reach distribution as such: it would down-convert
    to a schema1 manifest (or refuse to).
    """
    if client_accept:
        types = media_types(client_accept)
        if any(t in MANIFEST_TYPES or t.startswith("application/vnd.docker.distribution.manifest")
               for t in types):
            return client_accept
    return ", ".join(MANIFEST_TYPES)


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether a client's Accept header admits a cached manifest's media type."""
    types = media_types(accept)
    return not types or media_type in types or "*/*" in types


@functools.lru_cache(maxsize=512)
def takes_index(accept: str | None) -> bool:
    """Whether the answer negotiated for this Accept may be an index (every index type)."""
    negotiated = media_types(manifest_accept(accept))
    return all(t in negotiated for t in INDEX_TYPES)


def references(document: object) -> list[tuple[Literal["blob", "manifest"], str]]:
    """What a parsed manifest references: ("blob", digest) for its config and layers,
    ("manifest", digest) for an index's manifests. Malformed parts are skipped."""
    if not isinstance(document, dict):
        return []
    found: list[tuple[Literal["blob", "manifest"], str]] = []
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(("blob", config["digest"]))
    pairs: tuple[tuple[Literal["blob", "manifest"], str], ...] = (
        ("blob", "layers"), ("manifest", "manifests"))
    for kind, key in pairs:
        items = document.get(key)
        if isinstance(items, list):
            found += [(kind, item["digest"]) for item in items
                      if isinstance(item, dict) and isinstance(item.get("digest"), str)]
    return found


def declared_sizes(document: object) -> list[tuple[str, int]]:
    """(digest, size) of an image manifest's config and layers, as its descriptors say
    (what a blob's fetch may plan its parts by). Malformed ones are skipped."""
    if not isinstance(document, dict):
        return []
    layers = document.get("layers")
    items = [document.get("config"), *(layers if isinstance(layers, list) else [])]
    return [(item["digest"], item["size"]) for item in items if isinstance(item, dict)
            and isinstance(item.get("digest"), str) and type(item.get("size")) is int
            and item["size"] >= 0]


def index_entries(document: object, platforms: tuple[str, ...]) -> list[str]:
    """The digests of an index's manifests for `platforms` (os/arch[/variant]; an entry
    without the variant asked for matches only when none was asked); () takes every one."""
    if not isinstance(document, dict) or not isinstance(document.get("manifests"), list):
        return []
    chosen = []
    for item in document["manifests"]:
        if not isinstance(item, dict) or not isinstance(item.get("digest"), str):
            continue
        found = item.get("platform")
        platform: dict[str, object] = found if isinstance(found, dict) else {}
        have = (str(platform.get("os", "")), str(platform.get("architecture", "")),
                str(platform.get("variant", "")))
        if not platforms or any(_platform_matches(want, have) for want in platforms):
            chosen.append(item["digest"])
    return chosen


def _platform_matches(wanted: str, have: tuple[str, str, str]) -> bool:
    os_, _, rest = wanted.partition("/")
    architecture, _, variant = rest.partition("/")
    return (os_, architecture) == have[:2] and (not variant or variant == have[2])
