"""Image references as users type them (`nginx`, `ghcr.io/org/app:1@sha256:...`) and
platforms (`linux/arm64/v8`): parsing with Docker's normalisation, and which platforms
match. Pure functions on strings; no I/O. Used by `warm`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RegistryError
from ..presets import PRESETS
from ..reference import parse_digest, validate_name, validate_tag
from .target import DOCKER_HUB, ClientConfError

# host[:port] of a registry; the first path component names one when it has a dot, a
# port or is localhost (distribution/reference's normalisation, as docker pull does it).
_REGISTRY_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")
_HUB_NAMES = frozenset({DOCKER_HUB, *PRESETS[DOCKER_HUB].aliases})
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A normalised image reference: registry, repository, and a tag and/or digest
    (with both, the digest is what is pulled, as docker does)."""

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def path(self, kind: str, reference: str) -> str:
        """The gateway path: /v2/<registry>/<repository>/<kind>/<reference>, so one gateway
        URL serves every registry (routing by path prefix)."""
        return f"/v2/{self.registry}/{self.repository}/{kind}/{reference}"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


def parse_image(text: str) -> ImageRef:
    """`nginx`, `nginx:1.27`, `docker.io/library/nginx`, `localhost:5000/app@sha256:...`.

    ClientConfError names the image and what is wrong with it."""
    value = text.strip()
    try:
        name, at, digest = value.partition("@")
        if at:
            digest = str(parse_digest(digest))
        tag: str | None = None
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            name, tag = name[:colon], validate_tag(name[colon + 1:])
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first.lower(), rest
            if not _REGISTRY_RE.fullmatch(registry):
                raise ClientConfError(f"image {value!r}: {first!r} is not a registry host")
        else:
            registry, repository = DOCKER_HUB, name
        if registry in _HUB_NAMES:
            registry = DOCKER_HUB
            if "/" not in repository:  # Docker Hub's official images live under library/
                repository = "library/" + repository
        validate_name(repository)
    except RegistryError as exc:
        raise ClientConfError(f"image {value[:200]!r}: {exc.message}") from None
    if tag is None and not at:
        tag = DEFAULT_TAG
    return ImageRef(registry, repository, tag, digest or None)


@dataclass(frozen=True, slots=True, order=True)
class Platform:
    """os/architecture[/variant] in OCI spelling, normalised like containerd does."""

    os: str
    architecture: str
    variant: str | None = None

    def matches(self, entry: Platform) -> bool:
        """Whether an index entry's platform is this one; a platform given without a
        variant matches every variant of its architecture (linux/arm: v6 and v7)."""
        return (self.os, self.architecture) == (entry.os, entry.architecture) and (
            self.variant is None or self.variant == entry.variant)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def normalise(os: str, architecture: str, variant: str | None, *,
              entry: bool = False) -> Platform:
    """containerd's platforms.Normalize: x86_64 is amd64, aarch64 is arm64 whose v8 is
    implied, armhf is arm/v7; variants are spelled v<N>. An index `entry` for arm without
    a variant is arm/v7 (containerd's reading); a platform asked for without one stays
    without, so that it matches every variant."""
    os, architecture = os.lower(), architecture.lower()
    variant = variant.lower() if variant else None
    if variant and variant[0].isdigit():
        variant = "v" + variant
    if os == "macos":
        os = "darwin"
    if architecture in ("x86_64", "x86-64", "amd64"):
        architecture = "amd64"
        variant = None if variant == "v1" else variant
    elif architecture in ("aarch64", "arm64"):
        architecture = "arm64"
        variant = None if variant in ("v8", "v8.0") else variant
    elif architecture in ("armhf", "armel"):
        architecture, variant = "arm", "v7" if architecture == "armhf" else "v6"
    elif architecture == "arm" and variant is None and entry:
        variant = "v7"
    elif architecture in ("i386", "i686", "x86"):
        architecture = "386"
    return Platform(os, architecture, variant)


_PART_RE = re.compile(r"[A-Za-z0-9._-]+")


def parse_platform(text: str) -> Platform:
    parts = text.strip().split("/")
    if not 2 <= len(parts) <= 3 or not all(_PART_RE.fullmatch(p) for p in parts):
        raise ClientConfError(f"platform {text.strip()[:80]!r}: want os/architecture"
                              "[/variant], e.g. linux/amd64 or linux/arm/v7")
    return normalise(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def parse_platforms(text: str) -> tuple[Platform, ...]:
    """`linux/amd64,linux/arm64`: the platforms in the order given, each once."""
    found = [parse_platform(part) for part in text.split(",") if part.strip()]
    if not found:
        raise ClientConfError("--platform: name at least one platform, e.g. linux/amd64")
    return tuple(dict.fromkeys(found))
