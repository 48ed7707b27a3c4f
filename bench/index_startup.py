"""The cache index at start-up: `python -m bench.index_startup [--entries N] [--files N]`.

Builds an index of N entries (default 1,000,000: images of a config and own layers over a
pool of shared base layers, one in ten a two-platform index) through the catalogue's own
statements, closes it cleanly, then measures what start-up costs: `open()` (time to
serving), the first `usage()` and `roots()`, `python -m gateway serve` on it until /v2/
answers (and on an empty data directory, for the interpreter's share), and both again
after an unclean stop (PRAGMA quick_check runs). Then writes a store tree of --files
files (default 100,000) with no index and measures the rebuild from it, extrapolated to
N. Prints a Markdown table and a JSON line; everything happens under --workdir (default:
a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway.cache.contents_db import Catalogue, FoundManifest
from gateway.cache.contents_schema import FILE, open_database
from gateway.cache.contents_sqlite import SqliteContents

from .procs import Proc, free_port, running
from .trees import CURRENT

NS = "docker.io"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
BASE_POOL = 5_000  # shared base layers
OWN_LAYERS = 3  # per image, besides its config and two base layers


def _digest(rng: random.Random) -> str:
    return "sha256:" + rng.randbytes(32).hex()


def _images(rng: random.Random, entries: int) -> Iterator[tuple[list[tuple[str, int]],
                                                                 list[FoundManifest]]]:
    """(blobs, manifests) per image until about `entries` objects exist."""
    now = time.time()
    base = [(_digest(rng), rng.randrange(1 << 20, 50 << 20)) for _ in range(BASE_POOL)]
    yield base, []
    made = BASE_POOL
    number = 0
    while made < entries:
        number += 1
        platforms = 2 if number % 10 == 0 else 1
        blobs: list[tuple[str, int]] = []
        manifests: list[FoundManifest] = []
        for _ in range(platforms):
            own = [(_digest(rng), rng.randrange(1 << 10, 20 << 20)) for _ in range(OWN_LAYERS)]
            config = (_digest(rng), rng.randrange(1 << 10, 8 << 10))
            blobs += [config, *own]
            children = [("blob", d) for d, _ in [config, *rng.sample(base, 2), *own]]
            manifests.append((NS, _digest(rng), 1500, f"org/app{number % 3000}", children,
                              now - rng.random() * 86400 * 30))
        if platforms > 1:
            manifests.append((NS, _digest(rng), 800, manifests[0][3],
                              [("manifest", m[1]) for m in manifests], manifests[0][5]))
        made += len(blobs) + len(manifests)
        yield blobs, manifests


def build_index(data_dir: Path, entries: int) -> float:
    """The catalogue of `entries` objects, written with its own statements; seconds."""
    started = time.perf_counter()
    db, _ = open_database(data_dir / FILE, thorough=False)
    catalogue = Catalogue(db)
    rng = random.Random(20261201)
    batch_blobs: list[tuple[str, str, int, float]] = []
    batch_manifests: list[FoundManifest] = []
    for blobs, manifests in _images(rng, entries):
        batch_blobs += [(NS, d, size, time.time()) for d, size in blobs]
        batch_manifests += manifests
        if len(batch_blobs) >= 20_000:
            catalogue.add_blobs(batch_blobs)
            catalogue.add_manifests(batch_manifests)
            batch_blobs, batch_manifests = [], []
    catalogue.add_blobs(batch_blobs)
    catalogue.add_manifests(batch_manifests)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.perf_counter() - started


async def measure_open(data_dir: Path) -> dict[str, float]:
    contents = SqliteContents(data_dir)
    started = time.perf_counter()
    await contents.open()
    opened = time.perf_counter()
    usage = await contents.usage()
    used = time.perf_counter()
    roots = await contents.roots(limit=100)
    rooted = time.perf_counter()
    for root in roots[:10]:
        contents.touch(NS, root.entry.kind, root.entry.digest)
    await contents.flush()
    await contents.close()
    assert roots and usage.objects > 0
    return {"open_s": opened - started, "usage_s": used - opened,
            "roots_100_s": rooted - used, "objects": usage.objects}


def plant_dead_session(data_dir: Path, name: str) -> None:
    """What a process that died with the index open leaves: its session, unlocked."""
    dead = data_dir / ".index" / "sessions" / name
    dead.mkdir(parents=True)
    (dead / ".owner").touch()


async def measure_unclean_open(data_dir: Path) -> float:
    """open() after a process died with the index open: quick_check runs before it
    returns (the reconciliation after it is in the background; not measured here)."""
    plant_dead_session(data_dir, "1-deadbeef")
    contents = SqliteContents(data_dir)
    started = time.perf_counter()
    await contents.open()
    took = time.perf_counter() - started
    await contents.close()  # stops the reconciliation: this tree has no files
    return took


def write_tree(data_dir: Path, files: int) -> int:
    """A store tree of about `files` files: images of a config and 4 layers (tiny blobs,
    the walk costs the same), one tag each. Returns the number of files written."""
    rng = random.Random(7)
    written = 0

    def put(kind: str, data: bytes, head: bytes = b"") -> str:
        nonlocal written
        hex_digest = hashlib.sha256(data).hexdigest()
        path = data_dir / NS / kind / "sha256" / hex_digest[:2] / hex_digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(head + data)
        written += 1
        return "sha256:" + hex_digest

    number = 0
    while written < files:
        number += 1
        blobs = [put("blobs", rng.randbytes(64)) for _ in range(5)]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"digest": blobs[0], "size": 64},
                           "layers": [{"digest": d, "size": 64} for d in blobs[1:]]}).encode()
        digest = put("manifests", body, OCI_MANIFEST.encode() + b"\n")
        tag = data_dir / NS / "tags" / f"org/app{number}" / "_tags" / "latest"
        tag.parent.mkdir(parents=True, exist_ok=True)
        tag.write_text(json.dumps({"digest": digest, "media_type": OCI_MANIFEST,
                                   "checked": 0}))
    return written


async def measure_rebuild(data_dir: Path) -> dict[str, float]:
    contents = SqliteContents(data_dir)
    started = time.perf_counter()
    await contents.open()
    opened = time.perf_counter()
    await contents.settled()
    settled = time.perf_counter()
    usage = await contents.usage()
    await contents.close()
    return {"open_s": opened - started, "rebuild_s": settled - started,
            "objects": usage.objects}


def _first_answer(proc: Proc, url: str, timeout: float = 120.0) -> float:
    """perf_counter() when `url` first answers (any HTTP status), polled every 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"the gateway exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return time.perf_counter()
        except urllib.error.HTTPError:
            return time.perf_counter()
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"the gateway did not answer {url} in {timeout:g}s:\n{proc.tail()}")


def time_to_serving(data_dir: Path, workdir: Path, name: str) -> dict[str, float]:
    """`python -m gateway serve` on `data_dir`: seconds from exec until /v2/ answers
    (the interpreter's own start included), and the index rebuilds it counted."""
    routes = workdir / "routes.yaml"
    routes.write_text(json.dumps({"routes": {"index.bench.test": {
        "upstream": "http://127.0.0.1:9"}}}))  # never asked: nothing is pulled
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--routes", str(routes),
            "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}", "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with running(f"index-{name}", argv, workdir / f"gateway-{name}.log", cwd=CURRENT.root,
                 env=CURRENT.env()) as proc:
        serving = _first_answer(proc, f"{url}/v2/") - started
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    rebuilds = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gateway_index_rebuilds_total"))
    return {"serving_s": serving, "rebuilds": rebuilds}


def measure_gateway(big: Path, workdir: Path) -> dict[str, float]:
    """Time to serving of the gateway process: on an empty data directory (what Python
    and the imports cost), and on the big index closed cleanly."""
    empty = workdir / "empty"
    empty.mkdir(exist_ok=True)
    bare = time_to_serving(empty, workdir, "empty")
    clean = time_to_serving(big, workdir, "clean")
    return {"gateway_empty_s": bare["serving_s"], "gateway_serving_s": clean["serving_s"],
            "gateway_serving_rebuilds": clean["rebuilds"]}


def measure_gateway_unclean(big: Path, workdir: Path) -> dict[str, float]:
    """The same after an unclean stop: quick_check before serving, then a reconciliation
    in the background (this index has no files: it drops entries until the stop). Last,
    as it changes the index."""
    plant_dead_session(big, "2-deadbeef")
    return {"gateway_after_crash_s": time_to_serving(big, workdir, "unclean")["serving_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_startup")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-gateway", action="store_true",
                        help="measure the catalogue only, not `python -m gateway serve`")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="index-startup-"))
    try:
        big = workdir / "big"
        big.mkdir(parents=True, exist_ok=True)
        build_s = build_index(big, args.entries)
        size = (big / FILE).stat().st_size
        clean = asyncio.run(measure_open(big))
        again = asyncio.run(measure_open(big))  # warm page cache, as a restart usually is
        gateway: dict[str, float] = {} if args.no_gateway else measure_gateway(big, workdir)
        unclean_s = asyncio.run(measure_unclean_open(big))
        if not args.no_gateway:
            gateway.update(measure_gateway_unclean(big, workdir))
        tree = workdir / "tree"
        files = write_tree(tree, args.files)
        rebuild = asyncio.run(measure_rebuild(tree))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    per_entry = rebuild["rebuild_s"] / max(rebuild["objects"], 1)
    result: dict[str, Any] = {
        "entries": clean["objects"], "index_bytes": size, "build_s": build_s,
        "open_s": clean["open_s"], "open_warm_s": again["open_s"], "usage_s": clean["usage_s"],
        "roots_100_s": clean["roots_100_s"], "open_after_crash_s": unclean_s,
        "rebuild_files": files, "rebuild_objects": rebuild["objects"],
        "rebuild_open_s": rebuild["open_s"], "rebuild_s": rebuild["rebuild_s"],
        "rebuild_extrapolated_s": per_entry * clean["objects"], **gateway}
    rows = [
        ("index entries", f"{result['entries']:,} ({size / (1 << 20):.0f} MiB on disk)"),
        *_gateway_rows(result),
        ("open() of a cleanly closed index: time to serving",
         f"{result['open_s']:.3f} s (again: {result['open_warm_s']:.3f} s; target < 5 s)"),
        ("first usage() / roots(limit=100)",
         f"{result['usage_s'] * 1000:.1f} ms / {result['roots_100_s'] * 1000:.1f} ms"),
        ("open() after an unclean stop (quick_check; reconciliation continues in the "
         "background)", f"{unclean_s:.2f} s"),
        (f"rebuild of a lost index from {files:,} files ({rebuild['objects']:,} objects)",
         f"{rebuild['rebuild_s']:.1f} s in the background (open() returned in "
         f"{rebuild['open_s']:.3f} s)"),
        (f"rebuild extrapolated to {result['entries']:,} entries",
         f"{result['rebuild_extrapolated_s']:.0f} s"),
    ]
    print("| index start-up | measured |\n|---|---|")
    print("\n".join(f"| {what} | {value} |" for what, value in rows))
    print(json.dumps(result), file=sys.stderr)
    return 0


def _gateway_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    if "gateway_serving_s" not in result:
        return []
    return [("`python -m gateway serve` on it: exec to the first answer of /v2/",
             f"{result['gateway_serving_s']:.2f} s (on an empty data directory: "
             f"{result['gateway_empty_s']:.2f} s; index rebuilds: "
             f"{result['gateway_serving_rebuilds']:g}; target < 5 s)"),
            ("the same after an unclean stop", f"{result['gateway_after_crash_s']:.2f} s")]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
