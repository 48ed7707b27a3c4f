"""The registries our users cannot reach, with their conventional mirror host labels.

Plain data: a preset is a route written for the user (its fields are routes.yaml keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    upstream: str
    label: str
    aliases: tuple[str, ...] = ()
    library_prefix: bool = False


PRESETS: Mapping[str, Preset] = {
    "docker.io": Preset(
        "https://registry-1.docker.io",
        "hub",
        aliases=("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com"),
        library_prefix=True,
    ),
    "gcr.io": Preset("https://gcr.io", "gcr"),
    "ghcr.io": Preset("https://ghcr.io", "ghcr"),
    "k8s.gcr.io": Preset("https://k8s.gcr.io", "k8s-gcr"),
    "registry.k8s.io": Preset("https://registry.k8s.io", "k8s"),
    "quay.io": Preset("https://quay.io", "quay"),
    "mcr.microsoft.com": Preset("https://mcr.microsoft.com", "mcr"),
    "docker.elastic.co": Preset("https://docker.elastic.co", "elastic"),
    "nvcr.io": Preset("https://nvcr.io", "nvcr"),
}
