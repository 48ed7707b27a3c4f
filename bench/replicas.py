"""Scenario 10, cold fan-in over three replicas (issue #12): three `serve` processes share
one SeaweedFS bucket (`storage:`) and one Redis (`redis:`), as a deployment on three
machines would, and 16 clients spread over them (6, 5, 5) pull the cold image through
the far upstream at once. Amplification is what the far upstream sent over the image's
size: 1.00 when every blob left it once, whichever replica fetched it.

SeaweedFS and Redis are started as the tests start them (tests/support/): the `weed`
that `make test` builds into .tools/bin, and Debian's redis-server.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from typing import Any

from .procs import wait_quiet
from .scenarios import REPO_NAME, Profile, _log
from .servers import World, far_upstream, gateway

Record = dict[str, Any]
REPLICAS, CLIENTS = 3, 16
AMPLIFICATION_TARGET = 1.0


def _missing(world: World) -> str | None:
    if not (world.tool.path.parent / "weed").is_file():
        return "no .tools/bin/weed (`make test` builds it)"
    if shutil.which("redis-server") is None:
        return "no redis-server (Debian's redis-server; `make test` installs it)"
    return None


def run(world: World, profile: Profile) -> list[Record]:
    missing = _missing(world)
    if missing is not None:
        _log(f"replicas: not measured: {missing}")
        return [{"scenario": "replica_fanin", "status": f"not measured: {missing}"}]
    # The tests' own starters, so the bench runs SeaweedFS and Redis as they are tested.
    from tests.support.redis import run_redis
    from tests.support.seaweed import run_seaweed

    size = world.image["size"]
    shares = [CLIENTS // REPLICAS + (1 if n < CLIENTS % REPLICAS else 0)
              for n in range(REPLICAS)]
    with contextlib.ExitStack() as stack:
        seaweed = stack.enter_context(run_seaweed(world.fresh_dir("replicas-seaweed"),
                                                  bucket="bench"))
        redis = stack.enter_context(run_redis(world.fresh_dir("replicas-redis")))
        far = stack.enter_context(far_upstream(world, latency_ms=profile.latency_ms,
                                               rate_mb=profile.rate_mb))
        sections = {"storage": seaweed.storage(prefix="bench"),
                    "redis": {"url": redis.url, "prefix": "bench:"}}
        servers = [stack.enter_context(gateway(
            world, far, world.fresh_dir(f"replica-{n}"), name=f"replica-{n}",
            sections=sections, label=f"replica {n}")) for n in range(REPLICAS)]
        far.reset()
        wait_quiet()
        began = time.monotonic()
        pulls = [subprocess.Popen(
            [str(world.tool.path), "pull", "-url", server.url, "-repo", REPO_NAME,
             "-clients", str(clients)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) for server, clients in zip(servers, shares, strict=True)]
        results = [_result(pull) for pull in pulls]
        wall = time.monotonic() - began
        stats = far.stats()
    errors = sum(int(r.get("errors") or 0) for r in results)
    record = {"scenario": "replica_fanin", "target": f"gateway x{REPLICAS}",
              "replicas": REPLICAS, "clients": CLIENTS, "shares": shares,
              "wall_s": round(wall, 3), "upstream_bytes": stats["total_bytes"],
              "amplification": round(stats["total_bytes"] / size, 3),
              "upstream_requests": stats["requests"], "errors": errors,
              "error_samples": [s for r in results for s in r.get("error_samples") or []][:5]}
    _log(f"replicas: {CLIENTS} clients over {REPLICAS} replicas: {record['wall_s']} s, "
         f"amplification {record['amplification']}, errors {errors}")
    return [record]


def _result(pull: subprocess.Popen[str]) -> Record:
    out, err = pull.communicate(timeout=900)
    if pull.returncode != 0:
        raise RuntimeError(f"benchtool pull failed ({pull.returncode}): {err[-500:]}")
    lines = out.strip().splitlines()
    result: Record = json.loads(lines[-1]) if lines else {}
    return result


def _record(records: list[Record]) -> Record | None:
    return next((r for r in records if r.get("scenario") == "replica_fanin"), None)


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    r = _record(records)
    if r is None:
        return []
    what = f"cold fan-in over {REPLICAS} replicas (one S3 bucket, one Redis), {CLIENTS} clients"
    if "status" in r:
        return [(what + ": amplification", "1.00", "1.00", r["status"], "**missed**")]
    direct = next((d for d in records if d.get("scenario") == "cold_fanin"
                   and d.get("target") == "direct"), None)
    wall = f"{r['wall_s']:.1f} s" + (f" = {r['wall_s'] / direct['wall_s']:.2f}× one direct pull"
                                     if direct and direct.get("wall_s") else "")
    met = not r["errors"] and r["amplification"] <= AMPLIFICATION_TARGET
    return [(what + ": amplification", "1.00 (each blob leaves the upstream once)", "1.00",
             f"{r['amplification']:.3f} ({wall}, {r['errors']} errors)",
             "**met**" if met else "**missed**")]


def section(records: list[Record]) -> list[str]:
    r = _record(records)
    if r is None or "status" in r:
        return []
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["upstream_requests"].items()))
    return [
        f"## 10. Cold fan-in over {REPLICAS} replicas", "",
        f"{REPLICAS} gateways (`serve`, one worker each) on one SeaweedFS bucket (`storage:`) "
        f"and one Redis (`redis:`), each with its own data directory for spools; {CLIENTS} "
        f"clients spread over them ({', '.join(map(str, r['shares']))}) pull the cold image "
        "through the far upstream at once, as in scenario 1, and verify every digest.", "",
        "| replicas | clients | wall s | upstream bytes | amplification | upstream requests "
        "| errors |", "|---|---|---|---|---|---|---|",
        f"| {REPLICAS} | {CLIENTS} | {r['wall_s']:.2f} | {r['upstream_bytes']:,} | "
        f"{r['amplification']:.3f} | {kinds} | {r['errors']} |", ""]
