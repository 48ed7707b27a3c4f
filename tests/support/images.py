"""Random but valid container images: gzip'd tar layers of incompressible bytes, a real
image config (rootfs.diff_ids = sha256 of each uncompressed tar), Docker schema2 or OCI
manifests, and multi-arch indexes; plus pushing them through the distribution API.

The manifests are pretty-printed JSON on purpose: a gateway that re-serialises a
manifest changes its digest, and the tests notice.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
from dataclasses import dataclass
from typing import Any

from .client import RegistryClient

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
ACCEPT_ALL_MANIFESTS = ", ".join(MANIFEST_TYPES)

_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "amd64": "amd64"}


def host_architecture() -> str:
    """The architecture in Go/OCI spelling (amd64, arm64) that dockerd will want."""
    return _GO_ARCH.get(platform.machine().lower(), platform.machine().lower())


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """Bytes plus the media type they are referenced with."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Image:
    """One single-platform image: its manifest, config and layers."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    os: str
    architecture: str
    variant: str | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    @property
    def platform(self) -> dict[str, str]:
        found = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            found["variant"] = self.variant
        return found


@dataclass(frozen=True)
class Index:
    """A multi-platform image index (OCI) or manifest list (Docker)."""

    manifest: Blob
    images: tuple[Image, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def image_for(self, architecture: str) -> Image:
        return next(image for image in self.images if image.architecture == architecture)


def _json_bytes(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=3) + "\n").encode()


def make_layer(
    rng: random.Random, file_sizes: tuple[int, ...], *, media_type: str
) -> tuple[Blob, str]:
    """A gzip'd tar of files with random (incompressible) content; returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("data")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        directory.mtime = 1_700_000_000
        tar.addfile(directory)
        for number, size in enumerate(file_sizes):
            member = tarfile.TarInfo(f"data/file-{rng.getrandbits(32):08x}-{number}.bin")
            member.size = size
            member.mode = 0o644
            member.mtime = 1_700_000_000
            tar.addfile(member, io.BytesIO(rng.randbytes(size)))
    uncompressed = raw.getvalue()
    return Blob(media_type, gzip.compress(uncompressed, mtime=0)), sha256_digest(uncompressed)


def make_image(
    *,
    layer_sizes: tuple[int, ...] = (64 * 1024, 256 * 1024),
    architecture: str | None = None,
    os: str = "linux",
    variant: str | None = None,
    oci: bool = False,
    seed: int | None = None,
    base: tuple[tuple[Blob, str], ...] = (),
) -> Image:
    """A valid single-platform image with one layer per entry of `layer_sizes` (bytes),
    on top of `base` layers ((blob, diff_id) from `make_layer`) that images may share.

    Each layer holds one file of that many random bytes, so the compressed size is
    about the same; the default image is a few hundred KiB.
    """
    rng = random.Random(seed)
    architecture = architecture or host_architecture()
    layer_type = OCI_LAYER if oci else DOCKER_LAYER
    built = [*base, *(make_layer(rng, (size,), media_type=layer_type) for size in layer_sizes)]
    layers = tuple(blob for blob, _ in built)
    diff_ids = tuple(diff_id for _, diff_id in built)
    config_document: dict[str, Any] = {
        "architecture": architecture,
        "os": os,
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    f"RGW_TEST_NONCE={rng.getrandbits(64):016x}"],
            "Cmd": ["/bin/true"],
            "Labels": {"org.opencontainers.image.title": "registry-gateway test image"},
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"test layer {n}"}
            for n in range(len(layers))
        ],
    }
    if variant:
        config_document["variant"] = variant
    config = Blob(OCI_CONFIG if oci else DOCKER_CONFIG, _json_bytes(config_document))
    manifest_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = Blob(manifest_type, _json_bytes({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }))
    return Image(manifest, config, layers, diff_ids, os, architecture, variant)


def make_index(
    *,
    platforms: tuple[tuple[str, str | None], ...] = (("amd64", None), ("arm64", "v8")),
    layer_sizes: tuple[int, ...] = (32 * 1024, 96 * 1024),
    oci: bool = False,
    seed: int | None = None,
) -> Index:
    """An index / manifest list over one fresh image per (architecture, variant)."""
    rng = random.Random(seed)
    images = tuple(
        make_image(layer_sizes=layer_sizes, architecture=architecture, variant=variant,
                   oci=oci, seed=rng.getrandbits(64))
        for architecture, variant in platforms
    )
    index_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    manifest = Blob(index_type, _json_bytes({
        "schemaVersion": 2,
        "mediaType": index_type,
        "manifests": [image.manifest.descriptor(platform=image.platform) for image in images],
    }))
    return Index(manifest, images)


def push_image(client: RegistryClient, repository: str, image: Image,
               *, tags: tuple[str, ...] = ("latest",)) -> Image:
    """Upload blobs, then the manifest by digest and under each tag."""
    for blob in image.blobs:
        client.push_blob(repository, blob.data, blob.digest)
    for reference in (image.digest, *tags):
        stored = client.push_manifest(repository, reference, image.manifest.data,
                                      image.manifest.media_type)
        assert stored in ("", image.digest), (stored, image.digest)
    return image


def push_index(client: RegistryClient, repository: str, index: Index,
               *, tags: tuple[str, ...] = ("latest",)) -> Index:
    """Push every platform image by digest, then the index under each tag."""
    for image in index.images:
        push_image(client, repository, image, tags=())
    for reference in (index.digest, *tags):
        stored = client.push_manifest(repository, reference, index.manifest.data,
                                      index.manifest.media_type)
        assert stored in ("", index.digest), (stored, index.digest)
    return index


def shared_images(count: int, seed: int) -> list[Image]:
    """`count` images on one base layer, five per middle layer, one layer of their own."""
    rng = random.Random(seed)
    base = make_layer(rng, (2 << 20,), media_type=DOCKER_LAYER)
    middles = [make_layer(rng, (1 << 20,), media_type=DOCKER_LAYER) for _ in range(count // 5 + 1)]
    return [make_image(layer_sizes=(1 << 20,), seed=seed * 1000 + i, base=(base, middles[i // 5]))
            for i in range(count)]


def unique_bytes(images: list[Image]) -> int:
    return sum({b.digest: b.size for image in images for b in image.blobs}.values())
