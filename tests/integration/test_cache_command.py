"""`registry-gateway cache du|ls|rm|gc --dry-run|verify` on a data directory populated by
pulling images through a real gateway from a real registry, while that gateway runs.
Every number is checked against the files on disk."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.gateway import REPOSITORY_ROOT, Gateway
from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    Blob,
    Image,
    Index,
    host_architecture,
    make_image,
    make_index,
    make_layer,
    sha256_digest,
)
from tests.support.pulls import fetch, pull_image, pull_index, wait_cached
from tests.support.upstreams import Upstream

pytestmark = pytest.mark.integration

ROUTE = "ghcr.io"


def image_on(base: tuple[Blob, str], seed: int, own_size: int = 40 * 1024) -> Image:
    """A valid image whose first layer is `base` (blob, diff_id) and whose second is its own."""
    rng = random.Random(seed)
    own, own_diff = make_layer(rng, (own_size,), media_type=DOCKER_LAYER)
    diff_ids = (base[1], own_diff)
    config = Blob(DOCKER_CONFIG, json.dumps({
        "architecture": host_architecture(), "os": "linux",
        "config": {"Env": [f"NONCE={rng.getrandbits(64):x}"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}, indent=2).encode())
    manifest = Blob(DOCKER_MANIFEST, json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config.descriptor(),
        "layers": [base[0].descriptor(), own.descriptor()]}, indent=3).encode())
    return Image(manifest, config, (base[0], own), diff_ids, "linux", host_architecture())


@dataclass
class Populated:
    gateway: Gateway
    upstream: Upstream
    images: dict[str, Image]  # name -> image, pulled in this order
    index: Index
    routes: Path  # the command's routes.yaml

    @property
    def data_dir(self) -> Path:
        return self.gateway.data_dir

    def path(self, kind: str, digest: str) -> Path:
        hex_digest = digest.partition(":")[2]
        return self.data_dir / ROUTE / kind / "sha256" / hex_digest[:2] / hex_digest

    def files_of(self, image: Image) -> set[Path]:
        return {self.path("manifests", image.digest)} | {
            self.path("blobs", b.digest) for b in image.blobs}

    def files_of_index(self) -> set[Path]:
        return {self.path("manifests", self.index.digest)}.union(
            *(self.files_of(image) for image in self.index.images))

    def object_files(self) -> dict[Path, int]:
        root = self.data_dir / ROUTE
        return {p: p.stat().st_size for kind in ("blobs", "manifests")
                for p in (root / kind).rglob("*") if p.is_file()}

    def command(self, *args: str, expect: int = 0, **cache: Any) -> str:
        """Run `registry-gateway cache ARGS` against the data directory; its stdout."""
        document = yaml.safe_load(self.routes.read_text())
        document["cache"].update(cache)
        self.routes.write_text(yaml.safe_dump(document))
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "cache", *args, "--routes", str(self.routes),
             "--data-dir", str(self.data_dir)], cwd=REPOSITORY_ROOT, capture_output=True,
            text=True, timeout=120)
        assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
        return done.stdout


async def populate(start_upstream: Callable[..., Upstream],
                   start_gateway: Callable[..., Gateway], http: aiohttp.ClientSession,
                   tmp_path: Path) -> Populated:
    upstream = start_upstream(ROUTE)
    gateway = start_gateway({"default_route": None,
                             "routes": {ROUTE: {"upstream": upstream.url}}})
    base = make_layer(random.Random(1), (96 * 1024,), media_type=DOCKER_LAYER)
    images = {"pinned/app": make_image(seed=2), "team/a": image_on(base, 3),
              "team/b": image_on(base, 4), "team/c": image_on(base, 5)}
    index = make_index(seed=6)
    url = gateway.url()
    for repository, image in images.items():
        upstream.push(repository, image, tags=("v1",))
        await pull_image(http, url, f"{ROUTE}/{repository}", "v1", image)
        await wait_cached(http, url, f"{ROUTE}/{repository}", image)
        await asyncio.sleep(0.05)  # distinct access times, whatever their resolution
    upstream.push_index("multi/arch", index, tags=("v2",))
    await pull_index(http, url, f"{ROUTE}/multi/arch", "v2", index)
    for image in index.images:
        await wait_cached(http, url, f"{ROUTE}/multi/arch", image)
    routes = tmp_path / "cache-routes.yaml"
    routes.write_text(yaml.safe_dump({
        "default_route": None, "routes": {ROUTE: {"upstream": upstream.url}},
        "cache": {"lease": "0s"}, "pins": [f"{ROUTE}/pinned/*"]}))
    return Populated(gateway, upstream, images, index, routes)


async def test_du_and_ls_agree_with_the_files(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    world = await populate(start_upstream, start_gateway, http, tmp_path)
    files = world.object_files()
    assert set(files) == world.files_of_index().union(
        *(world.files_of(image) for image in world.images.values()))

    du = json.loads(await asyncio.to_thread(world.command, "du", "--json"))
    assert du["bytes"] == sum(files.values())
    assert du["objects"] == len(files)
    (route,) = [r for r in du["routes"] if r["bytes"]]
    assert (route["route"], route["bytes"], route["objects"]) == \
        (ROUTE, sum(files.values()), len(files))
    repositories = {r["repository"]: r for r in du["repositories"]}
    team_a = world.files_of(world.images["team/a"])
    assert repositories["team/a"]["bytes"] == sum(files[p] for p in team_a)
    assert repositories["multi/arch"]["bytes"] == sum(files[p] for p in world.files_of_index())

    ls = json.loads(await asyncio.to_thread(world.command, "ls", "--json", ROUTE))
    images = {i["digest"]: i for i in ls["images"]}
    assert set(images) == {i.digest for i in world.images.values()} | {world.index.digest}
    shared = world.path("blobs", world.images["team/a"].layers[0].digest)
    for repository, image in world.images.items():
        listed = images[image.digest]
        assert listed["references"] == [f"{ROUTE}/{repository}:v1@{image.digest}"]
        assert listed["bytes"] == sum(files[p] for p in world.files_of(image))
        held = world.files_of(image) - ({shared} if repository.startswith("team/") else set())
        assert listed["unique_bytes"] == sum(files[p] for p in held)
    listed = images[world.index.digest]
    assert listed["bytes"] == listed["unique_bytes"] == \
        sum(files[p] for p in world.files_of_index())
    assert listed["references"] == [f"{ROUTE}/multi/arch:v2@{world.index.digest}"]
    # Most recently used first: the index was pulled last, the pinned image first.
    order = [i["digest"] for i in ls["images"]]
    assert (order[0], order[-1]) == (world.index.digest, world.images["pinned/app"].digest)

    text = await asyncio.to_thread(world.command, "du")
    assert f"{ROUTE}" in text and "KiB" in text


async def test_rm_removes_what_only_the_image_holds_and_gc_previews_lru_unpinned(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    world = await populate(start_upstream, start_gateway, http, tmp_path)
    before = world.object_files()
    team_a = world.images["team/a"]
    shared = world.path("blobs", team_a.layers[0].digest)

    out = await asyncio.to_thread(world.command, "rm", f"{ROUTE}/team/a:v1")
    assert f"removed {ROUTE}/team/a:v1@{team_a.digest}" in out
    after = world.object_files()
    assert set(before) - set(after) == world.files_of(team_a) - {shared}
    assert shared in after  # team/b and team/c still hold it
    await asyncio.to_thread(world.command, "rm", f"{ROUTE}/team/a:v1", expect=1)  # gone now

    # A cap that needs team/b's and team/c's space: LRU first, the pinned image (the
    # oldest) skipped; team/c frees the shared layer once team/b is gone.
    files = world.object_files()
    team_b, team_c = world.images["team/b"], world.images["team/c"]
    b_only = sum(files[p] for p in world.files_of(team_b) - {shared})
    total = sum(files.values())
    preview = json.loads(await asyncio.to_thread(
        world.command, "gc", "--dry-run", "--json", max_size=total - b_only - 1))
    assert [r["digest"] for r in preview["remove"]] == [team_b.digest, team_c.digest]
    assert [r["reason"] for r in preview["remove"]] == ["size", "size"]
    assert preview["remove"][1]["bytes"] == sum(files[p] for p in world.files_of(team_c))
    assert preview["would_free"] == b_only + preview["remove"][1]["bytes"]
    assert [r["digest"] for r in preview["kept_pinned"]] == [world.images["pinned/app"].digest]
    assert world.object_files() == files  # a preview removes nothing

    everything = json.loads(await asyncio.to_thread(
        world.command, "gc", "--dry-run", "--json", max_size=0))
    assert world.images["pinned/app"].digest not in [r["digest"] for r in everything["remove"]]
    assert everything["bytes_after"] == sum(files[p] for p in
                                            world.files_of(world.images["pinned/app"]))
    await asyncio.to_thread(world.command, "gc", expect=2)  # only ever a preview


async def test_verify_removes_corrupt_files_and_the_next_pull_fetches_them_again(
        start_upstream: Callable[..., Upstream], start_gateway: Callable[..., Gateway],
        http: aiohttp.ClientSession, tmp_path: Path) -> None:
    world = await populate(start_upstream, start_gateway, http, tmp_path)
    assert "all intact" in await asyncio.to_thread(world.command, "verify")
    image = world.images["team/c"]
    flipped, truncated = image.layers[1], image.config
    flipped_path, truncated_path = (world.path("blobs", b.digest) for b in (flipped, truncated))
    data = bytearray(flipped_path.read_bytes())
    data[100] ^= 0xFF
    flipped_path.write_bytes(bytes(data))
    truncated_path.write_bytes(truncated.data[:-10])

    report = json.loads(await asyncio.to_thread(world.command, "verify", "--json", expect=1))
    assert {d["name"] for d in report["corrupt"]} == {flipped.digest, truncated.digest}
    assert not flipped_path.exists() and not truncated_path.exists()
    assert report["objects"] == len(world.object_files()) + 2

    url = f"{world.gateway.url()}/v2/{ROUTE}/team/c/blobs/{flipped.digest}"
    again = await fetch(http, url, accept=None)
    assert again.status == 200, again.describe()
    assert sha256_digest(again.body) == flipped.digest
    assert again.headers["X-Cache"] == "MISS"
    await pull_image(http, world.gateway.url(), f"{ROUTE}/team/c", "v1", image)
    await wait_cached(http, world.gateway.url(), f"{ROUTE}/team/c", image)
    for blob, path in ((flipped, flipped_path), (truncated, truncated_path)):
        assert sha256_digest(path.read_bytes()) == blob.digest
    assert "all intact" in await asyncio.to_thread(world.command, "verify")
