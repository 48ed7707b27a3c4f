"""The `cache` command's pure parts (human units, the eviction plan, what is kept) and its
answers on a store tree written with FsStore, run in process through the CLI."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.cache.contents import Entry, Root, Usage
from gateway.cli import main
from gateway.config import load_config
from gateway.maintenance.gc import Keeper, plan
from gateway.maintenance.listing import Filesystem
from gateway.maintenance.report import age, human
from tests.unit.test_contents_conformance import OCI_INDEX, Tree, image_body, index_body

ROUTES = """
routes:
  ghcr.io: {upstream: "http://127.0.0.1:9", max_size: 1MiB}
  docker.io: {upstream: "http://127.0.0.1:9"}
cache: {max_size: 10GiB, min_free: 20GiB, max_idle: 30d, lease: 10m}
pins:
  - ghcr.io/org/keep:*
  - nginx@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
"""


def test_sizes_and_ages_read_like_du() -> None:
    assert [human(n) for n in (0, 1023, 1536, 10 << 20, 150 << 30)] == \
        ["0 B", "1023 B", "1.5 KiB", "10.0 MiB", "150 GiB"]
    assert [age(1e6 - s, 1e6) for s in (5, 120, 7200, 3 * 86400)] == \
        ["5s ago", "2m ago", "2h ago", "3d ago"]


def test_the_plan_goes_idle_then_quotas_then_size_then_free_space() -> None:
    config = load_config(ROUTES, env={})
    usage = Usage(total=50 << 30, objects=10)
    steps = plan(config, usage, Filesystem(size=100 << 30, free=5 << 30), now=1e9)
    assert [(s.reason, s.namespace, s.max_bytes) for s in steps] == [
        ("idle", None, None), ("quota", "ghcr.io", 1 << 20), ("size", None, 10 << 30),
        ("free space", None, (50 << 30) - (15 << 30))]
    assert steps[0].idle_before == 1e9 - 30 * 86400
    roomy = plan(config, usage, Filesystem(size=100 << 30, free=90 << 30), now=1e9)
    assert "free space" not in [s.reason for s in roomy]


def _root(namespace: str, repository: str, tags: tuple[str, ...], digest: str,
          last_access: float) -> Root:
    entry = Entry(namespace, "manifest", digest, 10, last_access)
    return Root(entry, last_access, (entry,), (repository,),
                tuple((repository, t) for t in tags))


def test_pinned_and_leased_roots_are_kept() -> None:
    config = load_config(ROUTES, env={})
    keep = Keeper(config, now=1e9)
    assert keep(_root("ghcr.io", "org/keep", ("v1",), "sha256:" + "b" * 64, 0))
    assert keep(_root("docker.io", "library/nginx", (), "sha256:" + "a" * 64, 0))
    unknown = Root(Entry("docker.io", "manifest", "sha256:" + "a" * 64, 1, 0), 0, ())
    assert keep(unknown)  # a digest pin holds where the repository is not known
    assert not keep(_root("docker.io", "library/nginx", ("1.27",), "sha256:" + "c" * 64, 0))
    assert keep(_root("ghcr.io", "org/other", (), "sha256:" + "d" * 64, 1e9 - 60))  # leased
    assert list(keep.leased) == ["sha256:" + "d" * 64]
    assert len(keep.pinned) == 2


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    data_dir = tmp_path / "data"
    tree = Tree(data_dir)

    async def write() -> dict[str, str]:
        layer = await tree.blob(b"layer", "ghcr.io")
        config = await tree.blob(b"config", "ghcr.io")
        child = await tree.manifest(image_body(config, layer), namespace="ghcr.io")
        index = await tree.manifest(index_body(child), OCI_INDEX, "ghcr.io")
        await tree.tag("org/app", "v1", index, "ghcr.io")
        return {"child": child, "index": index, "layer": layer, "config": config}

    digests = asyncio.run(write())
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    return data_dir, routes, digests


def test_rm_names_the_index_that_holds_a_platform_manifest(
        populated: tuple[Path, Path, dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, routes, d = populated
    where = ["--routes", str(routes), "--data-dir", str(data_dir)]
    assert main(["cache", "rm", f"ghcr.io/org/app@{d['child']}", *where]) == 1
    assert f"it is part of ghcr.io@{d['index']}: remove that instead" in capsys.readouterr().err
    assert main(["cache", "rm", "ghcr.io/nothing/here:v1", *where]) == 1
    assert "no cached image matches" in capsys.readouterr().err
    assert main(["cache", "rm", "unknown.example/x:1", *where]) == 1
    assert "no route serves unknown.example" in capsys.readouterr().err
    assert main(["cache", "rm", "--json", "ghcr.io/org/app:v1", *where]) == 0
    (removed,) = json.loads(capsys.readouterr().out)["images"]
    assert set(removed["removed"]) == set(d.values())
    assert [p for kind in ("blobs", "manifests")
            for p in (data_dir / "ghcr.io" / kind).rglob("*") if p.is_file()] == []
    assert main(["cache", "du", "--json", *where]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"] == 0


def test_ls_of_an_unknown_route_says_which_exist(
        populated: tuple[Path, Path, dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    data_dir, routes, _ = populated
    assert main(["cache", "ls", "quay.io", "--routes", str(routes),
                 "--data-dir", str(data_dir)]) == 1
    assert "no route 'quay.io'" in capsys.readouterr().err
    assert main(["cache", "ls", "ghcr.io", "--routes", str(routes),
                 "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "ghcr.io/org/app:v1@sha256:" in out and "1 images" in out
