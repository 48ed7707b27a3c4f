"""The manifests `warm` reads, parsed from the bytes the gateway sent: an index (entries
with their platforms) or an image manifest (config and layers); and which entries a
platform list selects. Pure values and functions; no I/O."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RegistryError
from ..oci import INDEX_TYPES, MANIFEST_TYPES
from ..reference import parse_digest
from .imageref import Platform, normalise

ACCEPT = ", ".join(MANIFEST_TYPES)  # every index and image type: the index is what we pick in
# Layers the registry does not hold (Windows base layers, fetched from their `urls`).
_FOREIGN = ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")


class WarmError(Exception):
    """Why one image could not be warmed; the message names the object and the cause."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    attestation: bool = False  # buildx's attestation manifests: no platform to run

    def short(self) -> str:
        return self.digest[:19]


@dataclass(frozen=True, slots=True)
class IndexDoc:
    entries: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class ImageDoc:
    config: Descriptor
    layers: tuple[Descriptor, ...]
    foreign: int = 0  # layers skipped: the registry does not hold them

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)


def digest_of(data: bytes, like: str) -> str:
    """The digest of `data` with the algorithm of the digest `like`."""
    algorithm = like.partition(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def parse_manifest(media_type: str | None, body: bytes) -> IndexDoc | ImageDoc:
    """An index or image manifest; WarmError for anything else (schema1, not JSON)."""
    try:
        document = json.loads(body)
    except ValueError:
        raise WarmError("the manifest is not JSON") from None
    if not isinstance(document, dict):
        raise WarmError("the manifest is not a JSON object")
    kind = media_type or document.get("mediaType")
    if kind not in MANIFEST_TYPES:
        raise WarmError(f"{str(kind)[:100]!r} is not an image or index manifest type")
    if kind in INDEX_TYPES:
        return IndexDoc(tuple(_descriptor(item, f"manifests[{n}]", entry=True)
                              for n, item in enumerate(_list(document, "manifests"))))
    config = _descriptor(document.get("config"), "config")
    layers = [_descriptor(item, f"layers[{n}]")
              for n, item in enumerate(_list(document, "layers"))]
    kept = tuple(layer for layer in layers if layer.media_type not in _FOREIGN)
    return ImageDoc(config, kept, len(layers) - len(kept))


def _list(document: Mapping[str, Any], key: str) -> list[Any]:
    value = document.get(key)
    if not isinstance(value, list):
        raise WarmError(f"the manifest's {key!r} is not a list")
    return value


def _descriptor(item: Any, where: str, *, entry: bool = False) -> Descriptor:
    if not isinstance(item, dict):
        raise WarmError(f"the manifest's {where} is not a descriptor")
    media_type, digest, size = item.get("mediaType"), item.get("digest"), item.get("size")
    if not isinstance(digest, str) or not isinstance(size, int) or size < 0 or \
            isinstance(size, bool):
        raise WarmError(f"the manifest's {where} has no valid digest and size")
    try:
        parse_digest(digest)
    except RegistryError as exc:
        raise WarmError(f"the manifest's {where}: {exc.message}") from None
    platform, attestation = None, False
    if entry:
        raw = item.get("platform")
        if isinstance(raw, dict) and isinstance(raw.get("os"), str) and \
                isinstance(raw.get("architecture"), str):
            variant = raw.get("variant")
            platform = normalise(raw["os"], raw["architecture"],
                                 variant if isinstance(variant, str) else None, entry=True)
        annotations = item.get("annotations")
        attestation = (isinstance(annotations, dict) and annotations.get(
            "vnd.docker.reference.type") == "attestation-manifest") or (
            platform is not None and (platform.os, platform.architecture) == ("unknown",
                                                                             "unknown"))
    return Descriptor(media_type if isinstance(media_type, str) else "", digest, size,
                      platform, attestation)


@dataclass(frozen=True, slots=True)
class Selection:
    chosen: tuple[Descriptor, ...]  # the entries to warm, in the index's order, each once
    missing: tuple[Platform, ...]  # platforms asked for that the index does not have


def select(entries: Sequence[Descriptor], wanted: Sequence[Platform] | None) -> Selection:
    """The entries of an index to warm: those matching `wanted`, or with None every
    platform the index has (attestation manifests are never pulled by a runtime: skipped)."""
    runnable = [e for e in entries if not e.attestation]
    if wanted is None:
        chosen = runnable
        missing: list[Platform] = []
    else:
        chosen = [e for e in runnable
                  if e.platform is not None and any(w.matches(e.platform) for w in wanted)]
        missing = [w for w in wanted
                   if not any(e.platform is not None and w.matches(e.platform) for e in chosen)]
    first: dict[str, Descriptor] = {}
    for entry in chosen:
        first.setdefault(entry.digest, entry)
    return Selection(tuple(first.values()), tuple(missing))
