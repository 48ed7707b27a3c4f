"""Scenarios 1-5 (6, eviction, is in eviction.py; 7, start-up, in startup.py). Each is
a small function that starts what it needs, measures, stops it, and returns records
(dicts, one JSON line each). A record with errors > 0 carries no speed: the report says
the run had errors instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .procs import OtherLoad, children_cpu, cpu_seconds, peak_rss_mb, reset_peak_rss, wait_quiet
from .rounds import interleaved, merge_rate, merge_warm
from .servers import (
    Far,
    Server,
    World,
    distribution,
    far_upstream,
    gateway,
    gateway_has_tls,
    nginx,
)
from .trees import GatewayTree
from .workers import workers_of

Record = dict[str, Any]
REPO_NAME = "bench/app"
Launcher = Callable[..., contextlib.AbstractContextManager[Server]]
TARGETS: dict[str, Launcher] = {"gateway": gateway, "distribution": distribution}


def launcher_of(target: str) -> Launcher:
    """A target's launcher; `gateway-wN` is the gateway with N worker processes."""
    workers = workers_of(target)
    if workers is not None:
        return functools.partial(gateway, workers=workers, label=target)
    return TARGETS[target]


@dataclass(frozen=True)
class Profile:
    name: str
    layers_mib: tuple[float, ...]  # the image: ~8 layers
    ttfb_blob_mib: float
    fanin_clients: tuple[int, ...]
    ttfb_reps: int
    warm_clients: tuple[int, ...]
    warm_window: float
    rate_window: float
    rate_conns: int = 16
    latency_ms: float = 40
    rate_mb: float = 32  # per connection, MB/s
    pair_rounds: int = 3  # with a baseline: each window this often on each gateway
    # 6. eviction: images of these layers, pulled through a cap of this share of them all
    evict_images: int = 25
    evict_layers_mib: tuple[float, ...] = (20, 20, 20, 20)
    evict_cap_fraction: float = 0.25
    evict_clients: int = 4
    evict_rounds: int = 2  # each round: once with no cap, once capped
    # 7. index start-up: entries in the index, files in the store rebuilt from
    index_entries: int = 1_000_000
    index_files: int = 200_000  # the 1M rebuild is extrapolated (and printed as such)


FULL = Profile("full", (110, 90, 70, 50, 40, 25, 10, 5), 200, (1, 4, 16), 5, (1, 8, 32), 8, 5)
QUICK = Profile("quick", (24, 20, 16, 12, 8, 6, 4, 2), 50, (1, 4, 16), 3, (1, 8, 32), 3, 2,
                pair_rounds=2, evict_images=12, evict_layers_mib=(16, 16), evict_rounds=1,
                index_files=20_000)


def _errors(result: dict[str, Any]) -> dict[str, Any]:
    return {"errors": int(result.get("errors") or 0),
            "error_samples": list(result.get("error_samples") or [])[:5]}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- 1. cold fan-in


def cold_fanin(world: World, profile: Profile, targets: tuple[str, ...]) -> list[Record]:
    """C clients pull the image at once from a cold cache through the far upstream."""
    image = world.image
    size = image["size"]
    records: list[Record] = []
    with far_upstream(world, latency_ms=profile.latency_ms, rate_mb=profile.rate_mb) as far:
        far.reset()
        direct = world.tool.run("pull", "-url", far.url, "-repo", REPO_NAME, "-clients", "1")
        stats = far.stats()
        records.append({"scenario": "cold_fanin", "target": "direct", "clients": 1,
                        "wall_s": round(direct["wall_seconds"], 3),
                        "upstream_bytes": stats["total_bytes"],
                        "amplification": round(stats["total_bytes"] / size, 3),
                        "upstream_requests": stats["requests"], **_errors(direct)})
        _log(f"cold fan-in: direct pull {direct['wall_seconds']:.2f}s")
        for target in targets:
            for clients in profile.fanin_clients:
                data = world.fresh_dir(f"cold-{target}-{clients}")
                with launcher_of(target)(world, far, data) as server:
                    far.reset()
                    wait_quiet()
                    cpu0 = cpu_seconds(server.pids())
                    reset_peak_rss(server.pids())
                    other = OtherLoad([*server.pids(), far.proxy.pid, far.registry.pid])
                    client0 = children_cpu()
                    result = world.tool.run("pull", "-url", server.url, "-repo", REPO_NAME,
                                            "-clients", str(clients))
                    client_cpu = children_cpu() - client0
                    other_cores = other.cores()
                    stats = far.stats()
                    record = {
                        "scenario": "cold_fanin", "target": target, "clients": clients,
                        "wall_s": round(result["wall_seconds"], 3),
                        "client_s": [round(s, 3) for s in result["client_seconds"]],
                        "upstream_bytes": stats["total_bytes"],
                        "amplification": round(stats["total_bytes"] / size, 3),
                        "upstream_requests": stats["requests"],
                        "server_cpu_s": round(cpu_seconds(server.pids()) - cpu0, 2),
                        "peak_rss_mb": peak_rss_mb(server.pids()),
                        "client_cpu_s": round(client_cpu, 2),
                        "other_cores": other_cores, **_errors(result)}
                records.append(record)
                _log(f"cold fan-in: {target} C={clients}: {record['wall_s']}s, "
                     f"amplification {record['amplification']}, errors {record['errors']}")
                world.fresh_dir(f"cold-{target}-{clients}")  # free the disk
    return records


# ---------------------------------------------------------------- 2. time to first byte


def cold_ttfb(world: World, profile: Profile, targets: tuple[str, ...]) -> list[Record]:
    """A cold client asks for a cold 200 MB blob: time until its first body byte."""
    blob = world.image["extra_blobs"][0]
    args = ["-repo", REPO_NAME, "-digest", blob["digest"], "-size", str(blob["size"])]
    records: list[Record] = []
    with far_upstream(world, latency_ms=profile.latency_ms, rate_mb=profile.rate_mb) as far:
        for target in ("direct", *targets):
            samples: list[float] = []
            errors: list[str] = []
            full: dict[str, Any] = {}
            for rep in range(profile.ttfb_reps):
                last = rep == profile.ttfb_reps - 1  # the last one reads and verifies it all
                extra = ["-full"] if last else []
                if target == "direct":
                    result = world.tool.run("ttfb", "-url", far.url, *args, *extra)
                else:
                    data = world.fresh_dir(f"ttfb-{target}")
                    with launcher_of(target)(world, far, data) as server:
                        result = world.tool.run("ttfb", "-url", server.url, *args, *extra)
                    world.fresh_dir(f"ttfb-{target}")
                if result.get("errors"):
                    errors += result.get("error_samples") or ["error"]
                elif "ttfb_seconds" in result:
                    samples.append(result["ttfb_seconds"])
                if last:
                    full = result
            record = {"scenario": "cold_ttfb", "target": target, "blob_bytes": blob["size"],
                      "ttfb_s": [round(s, 4) for s in samples],
                      "median_s": round(statistics.median(samples), 4) if samples else None,
                      "full_s": round(full.get("full_seconds", 0), 3),
                      "verified": bool(full.get("verified")),
                      "errors": len(errors), "error_samples": errors[:5]}
            records.append(record)
            _log(f"ttfb: {target}: median {record['median_s']}s over {len(samples)}, "
                 f"errors {len(errors)}")
    return records


# ---------------------------------------------------------------- 3/4. warm serving


def _pull_requests(image: dict[str, Any]) -> list[dict[str, Any]]:
    """One pull of the cached image, as a client does after resolving the tag."""
    m = image["manifest"]
    reqs = [{"method": "GET", "path": f"/v2/{REPO_NAME}/manifests/{m['digest']}",
             "digest": m["digest"], "size": m["size"], "accept": True}]
    for blob in (image["config"], *image["layers"]):
        reqs.append({"method": "GET", "path": f"/v2/{REPO_NAME}/blobs/{blob['digest']}",
                     "digest": blob["digest"], "size": blob["size"]})
    return reqs


def _rate_requests(image: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    m = image["manifest"]
    tag = f"/v2/{REPO_NAME}/manifests/{image['tag']}"
    by_digest = f"/v2/{REPO_NAME}/manifests/{m['digest']}"
    one = {"digest": m["digest"], "size": m["size"], "accept": True}
    return {
        "GET manifest by tag": [{"method": "GET", "path": tag, **one}],
        "HEAD manifest by tag": [{"method": "HEAD", "path": tag, **one}],
        "GET manifest by digest": [{"method": "GET", "path": by_digest, **one}],
        "HEAD manifest by digest": [{"method": "HEAD", "path": by_digest, **one}],
        "HEAD blob": [{"method": "HEAD", "path": f"/v2/{REPO_NAME}/blobs/{b['digest']}",
                       "digest": b["digest"], "size": b["size"]}
                      for b in (image["config"], *image["layers"])],
        # The image config (a few KB): a client GETs one per image (issue #12: at least
        # the manifest rate).
        "GET small blob": [{"method": "GET",
                            "path": f"/v2/{REPO_NAME}/blobs/{image['config']['digest']}",
                            "digest": image["config"]["digest"],
                            "size": image["config"]["size"]}],
    }


def _write_requests(world: World, name: str, reqs: list[dict[str, Any]]) -> Path:
    path = world.workdir / f"requests-{name.replace(' ', '-')}.json"
    path.write_text(json.dumps(reqs))
    return path


def _load(world: World, server: Server, far: Far | None, reqs: Path, conns: int,
          window: float, sample: int) -> dict[str, Any]:
    wait_quiet()
    aux = [far.proxy.pid, far.registry.pid] if far is not None else []
    args = ["-url", server.url, "-requests", str(reqs), "-conns", str(conns),
            "-duration", f"{window}s", "-sample", str(sample),
            "-pids", ",".join(map(str, server.pids())), "-aux-pids", ",".join(map(str, aux))]
    if server.url.startswith("https"):
        args += ["-ca", str(world.ca)]
    return world.tool.run("load", *args, timeout=window + 120)


def _turns(profile: Profile, servers: Sequence[Server], window: int) -> list[list[Server]]:
    """One window's measurements, in order: once on a lone server; with a baseline, on
    both gateways `pair_rounds` times, alternating which goes first."""
    rounds = profile.pair_rounds if len(servers) > 1 else 1
    return [interleaved(servers, window * rounds + r) for r in range(rounds)]


def warm_throughput(world: World, profile: Profile, servers: Sequence[Server], far: Far | None,
                    *, tls: bool) -> list[Record]:
    """C connections pull the cached image over and over for a fixed window; with a
    gateway and its baseline, each C is measured on both in alternating rounds, and each
    gateway's rounds are summed into one record."""
    reqs = _write_requests(world, "pull", _pull_requests(world.image))
    records: list[Record] = []
    for window, clients in enumerate(profile.warm_clients):
        runs: dict[str, list[Record]] = {server.name: [] for server in servers}
        for turn in _turns(profile, servers, window):
            for server in turn:
                runs[server.name].append(
                    _warm_window(world, profile, server, far, reqs, clients, tls=tls))
        records += [merge_warm(runs[server.name]) for server in servers]
    return records


def _warm_window(world: World, profile: Profile, server: Server, far: Far | None, reqs: Path,
                 clients: int, *, tls: bool) -> Record:
    if far is not None:
        far.reset()
    reset_peak_rss(server.pids())
    result = _load(world, server, far, reqs, clients, profile.warm_window, sample=64)
    gigabytes = result["bytes"] / 1e9
    upstream = far.stats()["total_requests"] if far is not None else 0
    record = {"scenario": "warm_throughput", "target": server.name, "tls": tls,
              "clients": clients, "seconds": round(result["seconds"], 3),
              "gb": round(gigabytes, 3),
              "gb_per_s": round(gigabytes / result["seconds"], 3),
              "server_cpu_s": round(result["server_cpu_seconds"], 2),
              "cpu_s_per_gb": round(result["server_cpu_seconds"] / gigabytes, 3)
              if gigabytes else None,
              "client_cpu_s": round(result["client_cpu_seconds"], 2),
              "other_cpu_s": round(result["other_cpu_seconds"], 2),
              "other_cores": round(result["other_cpu_seconds"] / result["seconds"], 2),
              "responses": result["responses"], "verified": result["verified"],
              "upstream_requests": upstream,
              "peak_rss_mb": peak_rss_mb(server.pids()), **_errors(result)}
    _log(f"warm: {server.name} {'TLS' if tls else 'HTTP'} C={clients}: "
         f"{record['gb_per_s']} GB/s, {record['cpu_s_per_gb']} CPU s/GB, "
         f"RSS {record['peak_rss_mb']} MB, errors {record['errors']}")
    return record


def manifest_rate(world: World, profile: Profile, servers: Sequence[Server], far: Far | None,
                  kinds: tuple[str, ...] | None = None) -> list[Record]:
    """GET/HEAD manifests by tag and digest, HEAD blobs: requests/s, latency, upstream load;
    with a gateway and its baseline, in alternating rounds as in warm_throughput."""
    records: list[Record] = []
    chosen = [(kind, reqs) for kind, reqs in _rate_requests(world.image).items()
              if kinds is None or kind in kinds]
    for window, (kind, reqs) in enumerate(chosen):
        path = _write_requests(world, kind, reqs)
        runs: dict[str, list[Record]] = {server.name: [] for server in servers}
        for turn in _turns(profile, servers, window):
            for server in turn:
                runs[server.name].append(_rate_window(world, profile, server, far, kind, path))
        records += [merge_rate(runs[server.name]) for server in servers]
    return records


def _rate_window(world: World, profile: Profile, server: Server, far: Far | None, kind: str,
                 path: Path) -> Record:
    if far is not None:
        far.reset()
    result = _load(world, server, far, path, profile.rate_conns, profile.rate_window, sample=1)
    responses = max(result["responses"], 1)
    upstream = far.stats()["total_requests"] if far is not None else 0
    record = {"scenario": "manifest_rate", "target": server.name, "kind": kind,
              "conns": profile.rate_conns, "seconds": round(result["seconds"], 3),
              "responses": result["responses"],
              "rps": round(result["responses"] / result["seconds"], 1),
              "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
              "cpu_s_per_1k": round(result["server_cpu_seconds"] / responses * 1000, 4),
              "client_cpu_s": round(result["client_cpu_seconds"], 2),
              "other_cpu_s": round(result["other_cpu_seconds"], 2),
              "other_cores": round(result["other_cpu_seconds"] / result["seconds"], 2),
              "upstream_requests": upstream,
              "upstream_per_1k": round(upstream / responses * 1000, 2),
              **_errors(result)}
    _log(f"rate: {server.name} {kind}: {record['rps']} req/s, p99 {record['p99_ms']} ms, "
         f"upstream/1k {record['upstream_per_1k']}, errors {record['errors']}")
    return record


_WRK_SCRIPT = """\
-- Checks every response (status and Docker-Content-Digest); prints the counts as JSON.
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0; want = args[1] end
function response(status, headers, body)
  if status ~= 200 or headers["Docker-Content-Digest"] ~= want then bad = bad + 1 end
end
function done(summary, latency, requests)
  local errors = 0
  for _, t in ipairs(threads) do errors = errors + t:get("bad") end
  io.write(string.format('{"requests": %d, "seconds": %f, "errors": %d, "socket_errors": %d,'
    .. ' "p50_ms": %f, "p99_ms": %f}\\n', summary.requests, summary.duration / 1e6, errors,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


WRK_KINDS = ("GET manifest by digest", "GET manifest by tag")


def wrk_crosscheck(world: World, profile: Profile, server: Server,
                   kinds: Sequence[str] = WRK_KINDS, *,
                   beside: Server | None = None) -> list[Record]:
    """The same manifest GET load from wrk (C, Lua-checked digest header), to show whether
    the Go client (which hashes every body) is what limits the request rate; with the
    server's CPU per request. On this 2-core machine the load generator's share decides
    how much of the machine `--workers 2` can use: the Go client took ~0.5 core there."""
    if server.url.startswith("https") or shutil.which("wrk") is None:
        return []
    m = world.image["manifest"]
    script = world.workdir / "check.lua"
    script.write_text(_WRK_SCRIPT)
    paths = {"GET manifest by digest": m["digest"], "GET manifest by tag": world.image["tag"]}
    servers = [server] if beside is None else [server, beside]
    return [record for kind in kinds
            for record in _wrk(world, profile, servers, kind, script, paths[kind])]


def _wrk(world: World, profile: Profile, servers: list[Server], kind: str, script: Path,
         reference: str) -> list[Record]:
    """`profile.pair_rounds` windows of wrk on each server, taking turns (this machine's
    rate drifts by ±15% from one window to the next): per server the median's rate, and
    the CPU per request of all its windows."""
    windows: dict[str, list[Record]] = {s.name: [] for s in servers}
    for turn in range(max(profile.pair_rounds, 1)):
        for server in interleaved(servers, turn):
            windows[server.name].append(_wrk_window(world, profile, server, kind, script,
                                                    reference))
    return [_wrk_record(profile, name, kind, rounds) for name, rounds in windows.items()]


def _wrk_record(profile: Profile, name: str, kind: str, rounds: list[Record]) -> Record:
    failed = next((r for r in rounds if "rps" not in r), None)
    if failed is not None:
        return failed
    middle = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
    requests = sum(r["requests"] for r in rounds)
    record = {"scenario": "wrk_crosscheck", "target": name,
              "kind": kind, "conns": profile.rate_conns, "rps": middle["rps"],
              "p50_ms": middle["p50_ms"], "p99_ms": middle["p99_ms"],
              "cpu_s_per_1k": round(sum(r["cpu_s"] for r in rounds) / requests * 1000, 4),
              "errors": sum(r["errors"] for r in rounds), "error_samples": [],
              "rounds": len(rounds), "round_rps": [r["rps"] for r in rounds]}
    _log(f"wrk: {name} {kind}: {record['rps']} req/s (median of {record['round_rps']}), "
         f"{record['cpu_s_per_1k']} CPU s/1k, errors {record['errors']}")
    return record


def _wrk_window(world: World, profile: Profile, server: Server, kind: str, script: Path,
                reference: str) -> Record:
    m = world.image["manifest"]
    wait_quiet()
    pids = server.pids()
    cpu_before = cpu_seconds(pids)
    proc = subprocess.run(
        ["wrk", "-t", "2", "-c", str(profile.rate_conns), "-d", f"{profile.rate_window:g}s",
         "-H", _accept_header(), "-s", str(script),
         f"{server.url}/v2/{REPO_NAME}/manifests/{reference}", "--", m["digest"]],
        capture_output=True, text=True, timeout=profile.rate_window + 60, check=False)
    cpu = cpu_seconds(pids) - cpu_before
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"scenario": "wrk_crosscheck", "target": server.name, "kind": kind, "errors": 1,
                "error_samples": [proc.stderr.strip()[:300] or proc.stdout[-300:]]}
    result = json.loads(lines[-1])
    return {"rps": round(result["requests"] / result["seconds"], 1),
            "requests": max(int(result["requests"]), 1), "cpu_s": cpu,
            "p50_ms": round(result["p50_ms"], 3), "p99_ms": round(result["p99_ms"], 3),
            "errors": int(result["errors"]) + int(result["socket_errors"])}


def _accept_header() -> str:
    return ("Accept: application/vnd.oci.image.manifest.v1+json, "
            "application/vnd.oci.image.index.v1+json, "
            "application/vnd.docker.distribution.manifest.v2+json, "
            "application/vnd.docker.distribution.manifest.list.v2+json")


@contextlib.contextmanager
def _warmed(world: World, far: Far, launcher: Launcher, slug: str, data: Path, *,
            tls: bool = False) -> Iterator[tuple[Server, Record]]:
    """A target whose cache holds the image (pulled once), restarted so that its memory
    and CPU counters start from the warm state; one verified pull proves it is warm."""
    if not any(data.iterdir()):
        with launcher(world, far, data, name=f"{slug}-warmup") as server:
            warm = world.tool.run("pull", "-url", server.url, "-repo", REPO_NAME)
            if warm.get("errors"):
                raise RuntimeError(f"warming {server.name} failed: {warm}")
    with launcher(world, far, data, tls=tls, name=f"{slug}-warm") as server:
        far.reset()
        args = ["-url", server.url, "-repo", REPO_NAME]
        if tls:
            args += ["-ca", str(world.ca)]
        check = world.tool.run("pull", *args)
        stats = far.stats()
        info = {"target": server.name, "tls": tls, "verify_pull_errors": check.get("errors"),
                "upstream_blob_bytes_on_warm_pull": stats["bytes"].get("blob_GET", 0)}
        yield server, info


def _cached_blobs(data: Path, image: dict[str, Any]) -> dict[str, Path]:
    """The gateway's committed blob files, `<data>/<namespace>/blobs/<alg>/<xx>/<hex>`.
    Only that layout counts: the spool (`<data>/.spool/`, per-process directories since
    the refactor) holds partial transfers whose names may start with a digest's hex."""
    files = {path.name: path for path in data.glob("*/blobs/*/*/*")
             if not path.parts[len(data.parts)].startswith(".") and path.is_file()}
    found: dict[str, Path] = {}
    for blob in (image["config"], *image["layers"]):
        hexpart = blob["digest"].split(":", 1)[1]
        if hexpart in files:
            found[blob["digest"]] = files[hexpart]
    return found


def _warm_pair(world: World, far: Far, stack: contextlib.ExitStack, target: str, data: Path,
               baseline: GatewayTree | None, records: list[Record]) -> list[Server]:
    """The warm target, and for the gateway its baseline too (both up, one measured at a
    time: an idle gateway uses no CPU, and CPU is counted per process)."""
    servers: list[Server] = []
    launchers: list[tuple[Launcher, str, Path]] = [(launcher_of(target), target, data)]
    if target == "gateway" and baseline is not None:
        launchers.append((functools.partial(gateway, tree=baseline), baseline.slug,
                          world.fresh_dir(f"warm-{baseline.slug}")))
    for launcher, slug, where in launchers:
        server, info = stack.enter_context(_warmed(world, far, launcher, slug, where))
        records.append({"scenario": "warm_setup", **info})
        servers.append(server)
    return servers


def warm_serving(world: World, profile: Profile, targets: tuple[str, ...], *,
                 throughput: bool, rate: bool, with_nginx: bool,
                 baseline: GatewayTree | None = None) -> list[Record]:
    """Scenarios 3 and 4 against each target, warm; nginx serves the gateway's files. A
    baseline gateway is measured beside the gateway (plain HTTP), window by window."""
    records: list[Record] = []
    with far_upstream(world, latency_ms=profile.latency_ms, rate_mb=profile.rate_mb) as far:
        gateway_data: Path | None = None
        dirs: dict[str, Path] = {}  # warmed already (the workers' target, for wrk)
        for target in targets:
            data = dirs.get(target) or world.fresh_dir(f"warm-{target}")
            if target == "gateway":
                gateway_data = data
            with contextlib.ExitStack() as stack:
                pair = _warm_pair(world, far, stack, target, data, baseline, records)
                if throughput:
                    records += warm_throughput(world, profile, pair, far, tls=False)
                if rate:
                    records += manifest_rate(world, profile, pair, far)
                    records += _wrk_beside_workers(world, profile, far, stack, targets,
                                                   target, pair[0], dirs)
            if not throughput:
                continue
            if target == "gateway" and not gateway_has_tls():
                records.append({"scenario": "warm_throughput", "target": "gateway", "tls": True,
                                "status": "not measured: `registry-gateway serve --help` has "
                                "no --tls-listen"})
                _log("warm: gateway TLS not measured (no TLS flags)")
                continue
            with _warmed(world, far, launcher_of(target), target, data, tls=True) as (server, info):
                records.append({"scenario": "warm_setup", **info})
                records += warm_throughput(world, profile, [server], far, tls=True)
        if with_nginx and gateway_data is not None:
            blobs = _cached_blobs(gateway_data, world.image)
            if len(blobs) != len(world.image["layers"]) + 1:
                raise RuntimeError(f"found {len(blobs)} cached blobs in {gateway_data}")
            manifests = {world.image["manifest"]["digest"]: _manifest_bytes(world)}
            with nginx(world, blobs, manifests) as servers:
                if throughput:
                    records += warm_throughput(world, profile, [servers.plain], None, tls=False)
                if rate:
                    records += manifest_rate(world, profile, [servers.plain], None, kinds=(
                        "GET manifest by digest", "HEAD manifest by digest", "HEAD blob",
                        "GET small blob"))
                    records += wrk_crosscheck(world, profile, servers.plain,
                                              kinds=("GET manifest by digest",))
                if throughput:
                    records += warm_throughput(world, profile, [servers.tls], None, tls=True)
    return records


def _wrk_beside_workers(world: World, profile: Profile, far: Far, stack: contextlib.ExitStack,
                        targets: tuple[str, ...], target: str, server: Server,
                        dirs: dict[str, Path]) -> list[Record]:
    """wrk on `server`; for the one-process gateway, beside the workers' target (up in
    the same phase, warmed once for both phases), window by window in alternating order:
    their ratio is one of #12's targets, and this machine's rate drifts over minutes."""
    many = next((t for t in targets if workers_of(t) is not None), None)
    if target in dirs:
        return []  # measured beside the one-process gateway
    if target != "gateway" or many is None:
        return wrk_crosscheck(world, profile, server)
    dirs[many] = world.fresh_dir(f"warm-{many}")
    other, info = stack.enter_context(_warmed(world, far, launcher_of(many), many, dirs[many]))
    if info.get("verify_pull_errors"):
        raise RuntimeError(f"warming {many} failed: {info}")
    return wrk_crosscheck(world, profile, server, beside=other)


def _manifest_bytes(world: World) -> bytes:
    """The manifest's bytes, as the upstream has them (for nginx's static copy)."""
    path = world.storage / "docker/registry/v2/blobs/sha256"
    hexpart = str(world.image["manifest"]["digest"]).split(":", 1)[1]
    return (path / hexpart[:2] / hexpart / "data").read_bytes()


# ---------------------------------------------------------------- 5. memory


def memory(records: list[Record]) -> list[Record]:
    """Peak RSS (VmHWM) of each server during scenarios 1 and 3, from their records."""
    out: list[Record] = []
    for r in records:
        if r.get("scenario") == "cold_fanin" and r["target"] != "direct":
            out.append({"scenario": "memory", "target": r["target"],
                        "phase": f"cold fan-in C={r['clients']}", "peak_rss_mb": r["peak_rss_mb"]})
        elif r.get("scenario") == "warm_throughput" and "peak_rss_mb" in r:
            out.append({"scenario": "memory", "target": r["target"],
                        "phase": f"warm {'TLS' if r['tls'] else 'HTTP'} C={r['clients']}",
                        "peak_rss_mb": r["peak_rss_mb"]})
    return out
