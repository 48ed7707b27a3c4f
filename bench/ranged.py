"""Scenario 8, parallel ranged fetch: a far upstream that paces each connection (32 MiB/s)
and all of them together (128 MiB/s), 80 ms away. The cold big blob's last byte and the
cold single-client pull of the image, through the gateway (one stream, and parallel parts
of several shapes) and direct; time to first byte; what the upstream sent.
"""

from __future__ import annotations

from typing import Any

from .procs import wait_quiet
from .scenarios import REPO_NAME, Profile, _errors, _log
from .servers import Far, World, far_upstream, gateway

Record = dict[str, Any]
RTT_MS = 80.0
PER_CONNECTION_MB = 32 * 1.048576  # 32 MiB/s in the far proxy's MB (10^6)
TOTAL_MB = 128 * 1.048576
BLOB_TARGET, IMAGE_TARGET = 0.35, 0.7  # of direct (issue #11)
# Route keys per run: the single stream (today), then part shapes to choose defaults by.
SHAPES: dict[str, dict[str, Any]] = {
    "single": {"parallel_fetch_threshold": "off"},
    "16MiB x6": {"parallel_fetch_threshold": "16MiB", "parallel_fetch_parts": 6},
    "8MiB x6": {"parallel_fetch_threshold": "8MiB", "parallel_fetch_parts": 6},
    "4MiB x6": {"parallel_fetch_threshold": "4MiB", "parallel_fetch_parts": 6},
    "4MiB x8": {"parallel_fetch_threshold": "4MiB", "parallel_fetch_parts": 8},
    "2MiB x6": {"parallel_fetch_threshold": "2MiB", "parallel_fetch_parts": 6},
}
DEFAULT_SHAPE = "4MiB x6"  # what CachePolicy's defaults are (keep in step)


def _measure(world: World, far: Far, url: str, blob: Record) -> Record:
    """The cold blob (first and last byte) and then the image (one client) from `url`.
    Each on a quiet machine, as every other measurement: the run before left hundreds of
    MB of dirty pages (a gateway run writes 600 MB), whose writeback would land in it."""
    wait_quiet()
    far.reset()
    got = world.tool.run("ttfb", "-url", url, "-repo", REPO_NAME, "-digest", blob["digest"],
                         "-size", str(blob["size"]), "-full")
    blob_bytes = far.stats()["total_bytes"]
    wait_quiet()
    far.reset()
    pull = world.tool.run("pull", "-url", url, "-repo", REPO_NAME, "-clients", "1")
    image_bytes = far.stats()["total_bytes"]
    errors = _errors(got)
    errors["errors"] += _errors(pull)["errors"] + (0 if got.get("verified") else 1)
    return {"ttfb_s": round(got.get("ttfb_seconds", 0), 4),
            "blob_s": round(got.get("full_seconds", 0), 3),
            "image_s": round(pull["wall_seconds"], 3),
            "blob_amplification": round(blob_bytes / blob["size"], 3),
            "image_amplification": round(image_bytes / world.image["size"], 3), **errors}


def run(world: World, profile: Profile) -> list[Record]:
    blob = world.image["extra_blobs"][0]
    records: list[Record] = []
    with far_upstream(world, latency_ms=RTT_MS, rate_mb=PER_CONNECTION_MB,
                      total_mb=TOTAL_MB) as far:
        direct = _measure(world, far, far.url, blob)
        records.append({"scenario": "ranged", "target": "direct", "shape": "-", **direct})
        _log(f"ranged: direct: blob {direct['blob_s']}s, image {direct['image_s']}s")
        for shape, keys in SHAPES.items():
            data = world.fresh_dir("ranged-gateway")
            with gateway(world, far, data, route=keys) as server:
                result = _measure(world, far, server.url, blob)
            world.fresh_dir("ranged-gateway")  # free the disk
            result["blob_vs_direct"] = round(result["blob_s"] / direct["blob_s"], 3)
            result["image_vs_direct"] = round(result["image_s"] / direct["image_s"], 3)
            records.append({"scenario": "ranged", "target": "gateway", "shape": shape,
                            "blob_bytes": blob["size"], **result})
            _log(f"ranged: gateway {shape}: blob {result['blob_s']}s "
                 f"({result['blob_vs_direct']}x), image {result['image_s']}s "
                 f"({result['image_vs_direct']}x), ttfb {result['ttfb_s']}s, "
                 f"amplification {result['blob_amplification']}/"
                 f"{result['image_amplification']}, errors {result['errors']}")
    return records


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    runs = {r["shape"]: r for r in records if r.get("scenario") == "ranged"
            and r["target"] == "gateway"}
    direct = next((r for r in records if r.get("scenario") == "ranged"
                   and r["target"] == "direct"), None)
    chosen, single = runs.get(DEFAULT_SHAPE), runs.get("single")
    if direct is None or chosen is None or single is None:
        return []
    if chosen.get("errors") or direct.get("errors"):
        return [("ranged fetch: cold blob, far upstream", "direct", f"≤ {BLOB_TARGET}x",
                 "**errors**", "**missed**")]
    amplification = max(chosen["blob_amplification"], chosen["image_amplification"])
    return [
        (f"ranged fetch ({DEFAULT_SHAPE}): cold blob's last byte", f"direct {direct['blob_s']} s",
         f"≤ {BLOB_TARGET}x", f"{chosen['blob_vs_direct']}x ({chosen['blob_s']} s)",
         "**met**" if chosen["blob_vs_direct"] <= BLOB_TARGET else "**missed**"),
        (f"ranged fetch ({DEFAULT_SHAPE}): cold single-client image pull",
         f"direct {direct['image_s']} s", f"≤ {IMAGE_TARGET}x",
         f"{chosen['image_vs_direct']}x ({chosen['image_s']} s)",
         "**met**" if chosen["image_vs_direct"] <= IMAGE_TARGET else "**missed**"),
        ("ranged fetch: time to first byte", f"one stream {single['ttfb_s']} s",
         "no worse", f"{chosen['ttfb_s']} s",
         "**met**" if chosen["ttfb_s"] <= single["ttfb_s"] * 1.1 + 0.01 else "**missed**"),
        ("ranged fetch: amplification", "1.00", "1.00", f"{amplification:.2f}",
         "**met**" if amplification <= 1.0 else "**missed**"),
    ]


def section(records: list[Record]) -> list[str]:
    runs = [r for r in records if r.get("scenario") == "ranged"]
    if not runs:
        return []
    rows = ["| " + " | ".join([
        r["target"], r["shape"], f"{r['ttfb_s']:.3f}", f"{r['blob_s']:.2f}",
        str(r.get("blob_vs_direct", "–")), f"{r['image_s']:.2f}",
        str(r.get("image_vs_direct", "–")), f"{r['blob_amplification']:.2f}",
        f"{r['image_amplification']:.2f}", str(r["errors"])]) + " |" for r in runs]
    return [
        "## 8. Parallel ranged fetch", "",
        f"The far upstream paces each connection to 32 MiB/s and all of them together to "
        f"128 MiB/s, {RTT_MS:g} ms per request (and per new connection). Cold gateway per "
        "run (fresh data directory): the cold blob of scenario 2 by one client (first "
        "byte, last byte, verified), then the image pulled by one client; direct is the "
        "same from the far upstream. Shapes are `parallel_fetch_threshold` x "
        f"`parallel_fetch_parts`; the defaults are {DEFAULT_SHAPE}.", "",
        "| target | shape | first byte s | blob s | blob vs direct | image s | "
        "image vs direct | blob amplification | image amplification | errors |",
        "|" + "---|" * 10, *rows, ""]
