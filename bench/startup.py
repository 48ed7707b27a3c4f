"""Scenario 7, start-up with a large cache index: runs `python -m bench.index_startup`
(its own process, its own temporary directory) and keeps its figures as one record; this
scenario's rows in the targets table and its section.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from .procs import REPO
from .scenarios import Profile
from .servers import World

Record = dict[str, Any]
SERVING_TARGET = 5.0


def run(world: World, profile: Profile) -> list[Record]:
    where = world.fresh_dir("index-startup")
    argv = [sys.executable, "-m", "bench.index_startup", "--entries",
            str(profile.index_entries), "--files", str(profile.index_files),
            "--workdir", str(where)]
    print(f"[bench {time.strftime('%H:%M:%S')}] index start-up: {profile.index_entries:,} "
          f"entries, rebuild from {profile.index_files:,} files", flush=True)
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=3600,
                          check=False)
    world.fresh_dir("index-startup")  # free the disk
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return [{"scenario": "index_startup", "target": "gateway", "errors": 1,
                 "error_samples": [(proc.stderr or proc.stdout).strip()[-500:]]}]
    record: Record = {"scenario": "index_startup", "target": "gateway", **json.loads(lines[-1]),
                      "took_s": round(time.monotonic() - began, 1), "errors": 0,
                      "error_samples": []}
    print(f"[bench {time.strftime('%H:%M:%S')}] index start-up: gateway serving in "
          f"{record.get('gateway_serving_s', 0):.2f}s with {record['entries']:,} entries, "
          f"rebuild {record['rebuild_s']:.1f}s from {record['rebuild_files']:,} files",
          flush=True)
    return [record]


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    r = next((x for x in records if x.get("scenario") == "index_startup"), None)
    if r is None:
        return []
    if r.get("errors"):
        return [("start-up with a large index", "–", "< 5 s", f"**errors ({r['errors']})**",
                 "**missed**")]
    serving = r["gateway_serving_s"]
    return [
        (f"start-up with an index of {r['entries']:,} entries: time to serving",
         f"empty data directory {r['gateway_empty_s']:.2f} s", f"< {SERVING_TARGET:g} s",
         f"{serving:.2f} s (after an unclean stop {r['gateway_after_crash_s']:.2f} s)",
         "**met**" if serving < SERVING_TARGET and not r["gateway_serving_rebuilds"]
         else "**missed**"),
        ("rebuild of a lost index (in the background)", "–", "reported",
         f"{r['rebuild_s']:.1f} s for {r['rebuild_files']:,} files"
         + ("" if r["rebuild_files"] >= r["entries"] else
            f" (≈ {r['rebuild_extrapolated_s']:.0f} s for {r['entries']:,})"), "reported"),
    ]


def section(records: list[Record]) -> list[str]:
    r = next((x for x in records if x.get("scenario") == "index_startup"), None)
    if r is None or r.get("errors"):
        return []
    rows = [
        ("index entries", f"{r['entries']:,} ({r['index_bytes'] / (1 << 20):.0f} MiB on "
         f"disk, built in {r['build_s']:.0f} s)"),
        ("`python -m gateway serve` on it: exec until /v2/ answers",
         f"{r['gateway_serving_s']:.2f} s (index rebuilds: {r['gateway_serving_rebuilds']:g})"),
        ("the same on an empty data directory (the interpreter and imports)",
         f"{r['gateway_empty_s']:.2f} s"),
        ("the same after an unclean stop (PRAGMA quick_check before serving; the "
         "reconciliation runs in the background)", f"{r['gateway_after_crash_s']:.2f} s"),
        ("the catalogue's open(), cleanly closed (again, warm)",
         f"{r['open_s'] * 1000:.1f} ms ({r['open_warm_s'] * 1000:.1f} ms)"),
        ("the catalogue's open() after an unclean stop", f"{r['open_after_crash_s']:.2f} s"),
        ("first usage() / roots(limit=100)",
         f"{r['usage_s'] * 1000:.1f} ms / {r['roots_100_s'] * 1000:.1f} ms"),
        (f"rebuild of a lost index from {r['rebuild_files']:,} files "
         f"({r['rebuild_objects']:,} objects), in the background",
         f"{r['rebuild_s']:.1f} s (open() returned in {r['rebuild_open_s'] * 1000:.0f} ms)"),
        (f"the rebuild extrapolated to {r['entries']:,} entries",
         f"{r['rebuild_extrapolated_s']:.0f} s"),
    ]
    return ["## 7. Start-up with a large index", "",
            "`python -m bench.index_startup`: an index of synthetic images (a config and own "
            "layers over a pool of shared base layers, one in ten a two-platform index) "
            "written with the catalogue's own statements and closed cleanly; then the "
            "gateway process started on it, and a store tree with no index rebuilt.", "",
            "| what | measured |", "|---|---|",
            *(f"| {what} | {value} |" for what, value in rows), ""]
