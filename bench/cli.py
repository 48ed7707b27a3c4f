"""`python -m bench [--quick] [--only 1,2,3,4,5]`: set up, run the scenarios, report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report, scenarios
from .procs import REPO, set_quiet_budget
from .servers import Tool, World, seed, versions

SCENARIOS = ("1", "2", "3", "4", "5")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark the gateway beside distribution's proxy mode and nginx; writes "
        "BENCHMARKS.md and JSON lines under bench/results/."))
    parser.add_argument("--quick", action="store_true",
                        help="small image, short windows (~3 minutes), for iteration")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="scenarios to run, e.g. 1,3 (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown report (default: BENCHMARKS.md for a full run of "
                        "everything, bench/results/<profile>.md otherwise)")
    parser.add_argument("--no-distribution", action="store_true",
                        help="measure the gateway (and nginx) only")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data and logs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS.jsonl",
                        help="measure nothing: write the report (--out, default BENCHMARKS.md) "
                        "from saved results, e.g. after editing bench/ANALYSIS.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.report_only is not None:
        saved = [json.loads(line) for line in args.report_only.read_text().splitlines() if line]
        out = args.out or REPO / "BENCHMARKS.md"
        out.write_text(report.markdown(saved))
        print(f"bench: report in {out}")
        return 0
    selected = {s.strip() for s in args.only.split(",") if s.strip()}
    if not selected <= set(SCENARIOS):
        print(f"--only: pick from {','.join(SCENARIOS)}", file=sys.stderr)
        return 2
    profile = scenarios.QUICK if args.quick else scenarios.FULL
    set_quiet_budget(30 if args.quick else 90)
    tool_path = REPO / ".tools/bin/benchtool"
    if not tool_path.exists():
        print("bench: .tools/bin/benchtool is missing; run ./scripts/install-bench-deps "
              "(make bench does)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="registry-gateway-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    world = World(workdir, Tool(tool_path), workdir / "keys", workdir / "upstream-storage")
    targets: tuple[str, ...] = ("gateway",) if args.no_distribution else (
        "gateway", "distribution")
    given = argv if argv is not None else sys.argv[1:]
    command = "make bench" if os.environ.get("MAKELEVEL") and not given else " ".join(
        ["python -m bench", *map(shlex.quote, given)])
    started = time.time()
    records: list[dict[str, Any]] = []
    try:
        world.tool.run("keygen", "-dir", str(world.keys))
        scenarios._log(f"seeding the upstream: layers {profile.layers_mib} MiB, "
                       f"blob {profile.ttfb_blob_mib} MiB")
        image = seed(world, layers_mib=list(profile.layers_mib),
                     extra_mib=[profile.ttfb_blob_mib])
        if "1" in selected or "5" in selected:
            records += scenarios.cold_fanin(world, profile, targets)
        if "2" in selected:
            records += scenarios.cold_ttfb(world, profile, targets)
        if selected & {"3", "4", "5"}:
            records += scenarios.warm_serving(
                world, profile, targets, throughput=bool(selected & {"3", "5"}),
                rate="4" in selected, with_nginx=True)
        if "5" in selected:
            records += scenarios.memory(records)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: work directory kept: {workdir}")
    meta = {"scenario": "meta", "command": command, "profile": profile.name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1), "machine": report.machine(),
            "versions": versions(), "image": {k: image[k] for k in ("size", "manifest")},
            "image_layers": len(image["layers"]),
            "ttfb_blob_bytes": image["extra_blobs"][0]["size"], "parameters": vars(profile)}
    records.insert(0, meta)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    jsonl = results / f"{stamp}-{profile.name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    full_run = not args.quick and selected == set(SCENARIOS) and not args.no_distribution
    out = args.out or (REPO / "BENCHMARKS.md" if full_run
                       else results / f"{stamp}-{profile.name}.md")
    out.write_text(report.markdown(records))
    print(f"bench: results in {jsonl.relative_to(REPO)}, report in {out}")
    errors = sum(int(r.get("errors") or 0) for r in records)
    if errors:
        print(f"bench: {errors} errors; the report shows no speed for runs with errors",
              file=sys.stderr)
        return 1
    return 0
