"""The preset upstream registries: their upstream URL, conventional host label and aliases.

Plain data shared by the server's config and the client-machine tools; imports nothing
from gateway and does no I/O.
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
    # Where the registry sends clients for tokens and blobs (auth, CDN, redirect targets):
    # allowed destinations of the forward proxy (tunnelled); `*` globs generated names.
    proxy_hosts: tuple[str, ...] = ()


# The registries our users cannot reach, with their conventional mirror host labels.
PRESETS: Mapping[str, Preset] = {
    "docker.io": Preset(
        "https://registry-1.docker.io",
        "hub",
        aliases=("registry-1.docker.io", "index.docker.io", "registry.hub.docker.com"),
        library_prefix=True,
        proxy_hosts=("auth.docker.io", "production.cloudflare.docker.com",
                     "docker-images-prod.6aa30f8b08e16409b46e0173d6de2f56"
                     ".r2.cloudflarestorage.com"),
    ),
    "gcr.io": Preset("https://gcr.io", "gcr", proxy_hosts=("storage.googleapis.com",)),
    "ghcr.io": Preset("https://ghcr.io", "ghcr",
                      proxy_hosts=("pkg-containers.githubusercontent.com",)),
    "k8s.gcr.io": Preset("https://k8s.gcr.io", "k8s-gcr",
                         proxy_hosts=("storage.googleapis.com",)),
    # registry.k8s.io redirects to the nearest Artifact Registry or S3 mirror (rpardini#147).
    "registry.k8s.io": Preset("https://registry.k8s.io", "k8s",
                              proxy_hosts=("*.pkg.dev",
                                           "prod-registry-k8s-io-*.amazonaws.com")),
    "quay.io": Preset("https://quay.io", "quay",
                      proxy_hosts=("cdn.quay.io", "cdn01.quay.io", "cdn02.quay.io",
                                   "cdn03.quay.io")),
    "mcr.microsoft.com": Preset("https://mcr.microsoft.com", "mcr",
                                proxy_hosts=("*.data.mcr.microsoft.com",)),
    "docker.elastic.co": Preset("https://docker.elastic.co", "elastic"),
    "nvcr.io": Preset("https://nvcr.io", "nvcr", proxy_hosts=("authn.nvidia.com",)),
}
