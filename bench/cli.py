"""`python -m bench [--quick] [--only 1,2,3,4,5,6,7,8] [--baseline REV]`: set up, run the scenarios,
report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import eviction, policy, ranged, replicas, report, scenarios, startup, trees
from . import workers as bench_workers
from .procs import REPO, set_quiet_budget
from .servers import Tool, World, seed, versions

# 6 eviction, 7 start-up with a big index, 8 parallel ranged fetch, 9 access rules and limits,
# 10 cold fan-in over three replicas (S3 + Redis)
SCENARIOS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark the gateway beside distribution's proxy mode and nginx; writes "
        "BENCHMARKS.md and JSON lines under bench/results/."))
    parser.add_argument("--quick", action="store_true",
                        help="small image, short windows (~3 minutes), for iteration")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="scenarios to run, e.g. 1,3 (default: all; 6 is eviction, "
                        "7 start-up with a large index, 8 parallel ranged fetch, "
                        "9 access rules and limits, 10 cold fan-in over three replicas)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown report (default: BENCHMARKS.md for a full run of "
                        "everything, bench/results/<profile>.md otherwise)")
    parser.add_argument("--no-distribution", action="store_true",
                        help="measure the gateway (and nginx) only")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data and logs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run the gateway at git revision REV (checked out into a "
                        "temporary worktree, removed afterwards) in scenarios 3 (plain HTTP) "
                        "and 4, window by window beside this tree, and report both")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="scenarios 3 and 4 also against `serve --workers N` (target "
                        "gateway-wN; default 2; 1: not)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="with --baseline: how often each of those windows runs on each "
                        "gateway, alternating which goes first (default: 3, --quick 2)")
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
    if args.baseline is not None and not selected & {"3", "4", "5"}:
        print("--baseline: the baseline runs in scenarios 3 and 4; --only has neither",
              file=sys.stderr)
        return 2
    if args.baseline is not None:
        try:
            trees.resolve(args.baseline)
        except RuntimeError:
            print(f"--baseline: {args.baseline!r} is not a commit of this repository",
                  file=sys.stderr)
            return 2
    profile = scenarios.QUICK if args.quick else scenarios.FULL
    if args.rounds is not None:
        if args.rounds < 1:
            print("--rounds: at least 1", file=sys.stderr)
            return 2
        profile = dataclasses.replace(profile, pair_rounds=args.rounds)
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
    command = _command(given, args.baseline)
    started = time.time()
    try:
        image, records, baselines = _measure(world, profile, selected, targets, args.baseline,
                                             workers=args.workers)
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
    if baselines:
        meta["baseline"] = baselines[0]
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


def _command(given: list[str], baseline: str | None) -> str:
    """How this run was started, for the report."""
    if os.environ.get("MAKELEVEL"):
        if not given:
            return "make bench"
        if baseline is not None and given == ["--baseline", baseline]:
            return f"make bench BASELINE={shlex.quote(baseline)}"
    return " ".join(["python -m bench", *map(shlex.quote, given)])


def _measure(world: World, profile: scenarios.Profile, selected: set[str],
             targets: tuple[str, ...], rev: str | None, *, workers: int = 1,
             ) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Seed the upstream and run the selected scenarios: (image, records, baselines)."""
    records: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    current = trees.CURRENT.describe()  # refuses a tree whose `python -m gateway` is not its own
    with contextlib.ExitStack() as stack:
        baseline = None
        if rev is not None:
            baseline = stack.enter_context(trees.baseline(rev, world.workdir / "baseline-src"))
            baselines.append({"rev": rev, **baseline.describe()})
            scenarios._log(f"baseline {baseline.label}: {baselines[0]['version']}, "
                           f"commit {baseline.commit}, gateway from {baselines[0]['module']}; "
                           f"this tree's from {current['module']}")
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
            # With N workers: one more target, right after the one-process gateway.
            warm = targets[:1] + ((bench_workers.target(workers),) if workers > 1 else ()) \
                + targets[1:]
            records += scenarios.warm_serving(
                world, profile, warm, throughput=bool(selected & {"3", "5"}),
                rate="4" in selected, with_nginx=True, baseline=baseline)
        if "5" in selected:
            records += scenarios.memory(records)
        if "6" in selected:
            records += eviction.run(world, profile)
        if "7" in selected:
            records += startup.run(world, profile)
        if "8" in selected:
            records += ranged.run(world, profile)
        if "9" in selected:
            records += policy.run(world, profile)
        if "10" in selected:
            records += replicas.run(world, profile)
    return image, records, baselines
