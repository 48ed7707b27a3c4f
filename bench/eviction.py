"""Scenario 6, eviction: images worth several times `cache.max_size` pulled once through a
gateway with no cap and once through one with the cap (`lease: 0s`, so eviction runs
through the pulls); from /proc and the gateway's /metrics: CPU per GB evicted and the
event-loop lag. Also this scenario's rows in the targets table and its section.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .procs import OtherLoad, cpu_seconds, wait_quiet
from .rounds import interleaved
from .scenarios import Profile, _log
from .servers import Far, Server, World, far_upstream, gateway, seed_images

Record = dict[str, Any]
REPO_PREFIX = "bench/evict"
LAG = "gateway_event_loop_lag_seconds"
LAG_TARGET = 0.005
SUMS = {"evicted_bytes": "gateway_evicted_bytes_total",
        "evicted_objects": "gateway_evicted_objects_total",
        "evictions": "gateway_evictions_total", "cache_bytes": "gateway_cache_bytes",
        "limit_bytes": "gateway_cache_limit_bytes",
        "upstream_bytes": "gateway_upstream_bytes_total"}


# ---------------------------------------------------------------- /metrics


def scrape(server: Server) -> Record:
    """The sums this scenario reads, and the lag histogram's cumulative buckets."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {name: key for key, name in SUMS.items()}
    out: Record = {key: 0.0 for key in SUMS}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[wanted[s.name]] += s.value
            elif s.name == LAG + "_bucket":
                buckets[float(s.labels["le"])] = s.value
    out["lag_buckets"] = buckets
    return out


def delta_buckets(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    return {edge: after[edge] - before.get(edge, 0.0) for edge in after}


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """As Prometheus' histogram_quantile: linear within the bucket the rank falls in."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    rank = q * total
    low, below = 0.0, 0.0
    for edge in sorted(buckets):
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return low  # above the largest bound: that bound, as Prometheus says
            return low + (edge - low) * (rank - below) / max(count - below, 1e-12)
        low, below = edge, count
    return low


def lag_summary(buckets: dict[float, float]) -> Record:
    total = buckets.get(math.inf, 0.0)
    p99 = quantile(0.99, buckets)
    # The upper bound of the highest bucket with a sample: the first that holds them all.
    worst = min((edge for edge, count in buckets.items() if count >= total),
                default=None) if total else None
    return {"lag_samples": int(total),
            "lag_p50_ms": _ms(quantile(0.5, buckets)), "lag_p99_ms": _ms(p99),
            "lag_over_5ms": int(total - buckets.get(LAG_TARGET, 0.0)),
            "lag_worst_bucket_ms": _ms(worst),
            "lag_buckets": {("+Inf" if math.isinf(e) else f"{e:g}"): int(c)
                            for e, c in sorted(buckets.items())}}


def _ms(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    return math.inf if math.isinf(seconds) else round(seconds * 1000, 3)


def _settle(server: Server, last: Record, *, timeout: float = 60.0) -> Record:
    """Wait until eviction has caught up: evicted bytes steady over 0.25 s."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.25)
        now = scrape(server)
        if now["evicted_bytes"] == last["evicted_bytes"] or time.monotonic() > deadline:
            return now
        last = now


# ---------------------------------------------------------------- the scenario


def _pull_all(world: World, far: Far, repos: Sequence[str], clients: int,
              cap: int | None, round_: int) -> Record:
    """Every image pulled once (`clients` at a time) through a fresh gateway. The data
    directory of a run with no cap stays for `_evict_alone`."""
    slug = "capped" if cap else "nocap"
    data = world.fresh_dir(f"evict-{slug}")
    cache: Record = {"lease": "0s", **({"max_size": cap} if cap else {})}
    with gateway(world, far, data, name=f"evict-{slug}-{round_}", cache=cache) as server:
        far.reset()
        wait_quiet()
        before = scrape(server)
        cpu0 = cpu_seconds(server.pids())
        other = OtherLoad([*server.pids(), far.proxy.pid, far.registry.pid])
        began = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda repo: world.tool.run(
                "pull", "-url", server.url, "-repo", repo), repos))
        wall = time.monotonic() - began
        other_cores = other.cores()
        pulled = scrape(server)  # the lag window is the pulls
        after = _settle(server, pulled)
        cpu = cpu_seconds(server.pids()) - cpu0
        stats = far.stats()
    if cap:
        world.fresh_dir(f"evict-{slug}")  # free the disk
    pulled_bytes = sum(int(r.get("bytes") or 0) for r in results)
    record: Record = {
        "scenario": "eviction", "target": server.name, "run": "max_size" if cap else "no cap",
        "round": round_, "cap_bytes": cap, "images": len(repos), "clients": clients,
        "pulled_bytes": pulled_bytes, "wall_s": round(wall, 2),
        "gb_per_s": round(pulled_bytes / 1e9 / wall, 3),
        "server_cpu_s": round(cpu, 3),
        "cpu_s_per_gb_pulled": round(cpu / (pulled_bytes / 1e9), 3) if pulled_bytes else None,
        "far_upstream_bytes": stats["total_bytes"], "other_cores": other_cores,
        **{k: int(after[k] - before[k]) for k in ("evicted_bytes", "evicted_objects",
                                                  "evictions", "upstream_bytes")},
        "cache_bytes_after": int(after["cache_bytes"]),
        "limit_bytes_after": int(after["limit_bytes"]),
        **lag_summary(delta_buckets(before["lag_buckets"], pulled["lag_buckets"])),
        "errors": sum(int(r.get("errors") or 0) for r in results),
        "error_samples": [e for r in results for e in (r.get("error_samples") or [])][:5]}
    _log(f"eviction: {record['run']} round {round_}: {pulled_bytes / 1e9:.2f} GB in {wall:.1f}s, "
         f"CPU {cpu:.2f}s, evicted {record['evicted_bytes'] / 1e9:.2f} GB, lag p99 "
         f"{record['lag_p99_ms']} ms ({record['lag_over_5ms']} of {record['lag_samples']} "
         f"> 5 ms), errors {record['errors']}")
    return record


class _Probe:
    """A light client load while eviction runs alone: one HEAD /v2/ every 10 ms, so the
    loop has requests to delay but the machine stays idle (what the lag then shows is the
    evictor's own cost to the loop, not cold pulls competing for two cores)."""

    def __init__(self, url: str) -> None:
        self._url = f"{url}/v2/"
        self._stop = threading.Event()
        self.requests = self.errors = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Probe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            request = urllib.request.Request(self._url, method="HEAD")
            try:
                with urllib.request.urlopen(request, timeout=5):
                    pass
            except OSError:
                self.errors += 1
            self.requests += 1


def _evicted_down(server: Server, *, timeout: float = 120.0) -> Record:
    """Wait until the cache is back under its limit and eviction has stopped."""
    deadline = time.monotonic() + timeout
    last = scrape(server)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = scrape(server)
        under = 0 < now["cache_bytes"] <= now["limit_bytes"]
        if under and now["evicted_bytes"] == last["evicted_bytes"]:
            return now
        last = now
    _log(f"eviction alone: not settled after {timeout:.0f}s: "
         f"{ {k: last[k] for k in ('cache_bytes', 'limit_bytes', 'evicted_bytes')} }")
    return last


def _evict_alone(world: World, far: Far, cap: int, round_: int) -> Record:
    """The no-cap run's full data directory served with the cap: the evictor brings it
    down to the low watermark while only the light probe runs. The window is from
    serving to settled; CPU is the gateway's over it (the probe's requests included)."""
    data = world.workdir / "evict-nocap"
    with gateway(world, far, data, name=f"evict-alone-{round_}",
                 cache={"lease": "0s", "max_size": cap}) as server:
        cpu0 = cpu_seconds(server.pids())
        began = time.monotonic()
        with _Probe(server.url) as probe:
            after = _evicted_down(server)
        wall = time.monotonic() - began
        cpu = cpu_seconds(server.pids()) - cpu0
    world.fresh_dir("evict-nocap")
    evicted = int(after["evicted_bytes"])  # a fresh process: its counters are this window's
    record: Record = {
        "scenario": "eviction_alone", "target": server.name, "round": round_,
        "cap_bytes": cap, "wall_s": round(wall, 2), "server_cpu_s": round(cpu, 3),
        "evicted_bytes": int(after["evicted_bytes"]),
        "evicted_objects": int(after["evicted_objects"]),
        "cpu_s_per_gb_evicted": round(cpu / (evicted / 1e9), 3) if evicted else None,
        "probe_requests": probe.requests, "errors": probe.errors,
        "error_samples": [f"{probe.errors} probe requests failed"] if probe.errors else [],
        **lag_summary(after["lag_buckets"])}  # from its start: opening the cache counts too
    _log(f"eviction alone round {round_}: evicted {record['evicted_bytes'] / 1e9:.2f} GB "
         f"({record['evicted_objects']} objects) in {wall:.1f}s, CPU {cpu:.2f}s, lag p99 "
         f"{record['lag_p99_ms']} ms ({record['lag_over_5ms']} of {record['lag_samples']} "
         f"> 5 ms), probe errors {probe.errors}")
    return record


def run(world: World, profile: Profile) -> list[Record]:
    """Seed the images, then the pulls without and with the cap, in alternating rounds."""
    repos = [f"{REPO_PREFIX}{n:03d}" for n in range(profile.evict_images)]
    _log(f"eviction: seeding {len(repos)} images of {profile.evict_layers_mib} MiB layers")
    images = seed_images(world, repos, layers_mib=list(profile.evict_layers_mib))
    total = sum(int(image["size"]) for image in images)
    cap = int(total * profile.evict_cap_fraction)
    records: list[Record] = []
    with far_upstream(world, latency_ms=profile.latency_ms, rate_mb=profile.rate_mb) as far:
        for round_ in range(profile.evict_rounds):
            for limit in interleaved([None, cap], round_):
                records.append(_pull_all(world, far, repos, profile.evict_clients, limit,
                                         round_))
            records.append(_evict_alone(world, far, cap, round_))
    records.append(summary(records, total))
    return records


def summary(runs: list[Record], total: int) -> Record:
    """All rounds together: CPU the capped pulls cost beyond the same pulls uncapped, per
    GB evicted; the lag over all capped windows (buckets summed)."""
    pulls = [r for r in runs if r["scenario"] == "eviction"]
    nocap = [r for r in pulls if r["run"] == "no cap"]
    capped = [r for r in pulls if r["run"] == "max_size"]
    evicted = sum(r["evicted_bytes"] for r in capped)
    extra = sum(r["server_cpu_s"] for r in capped) - sum(r["server_cpu_s"] for r in nocap)
    record: Record = {
        "scenario": "eviction_cost", "target": capped[0]["target"], "rounds": len(capped),
        "images_bytes": total, "cap_bytes": capped[0]["cap_bytes"],
        "evicted_bytes": evicted, "extra_cpu_s": round(extra, 3),
        "cpu_s_per_gb_evicted": round(extra / (evicted / 1e9), 3) if evicted else None,
        "errors": sum(r["errors"] for r in pulls),
        "error_samples": [e for r in pulls for e in r["error_samples"]][:5]}
    for name, group in (("capped", capped), ("nocap", nocap)):
        lag = lag_summary(_merged(group))
        record.update({f"{name}_{k}": v for k, v in lag.items() if k != "lag_buckets"})
    return record


# ---------------------------------------------------------------- report


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    r = next((x for x in records if x.get("scenario") == "eviction_cost"), None)
    alone = [x for x in records if x.get("scenario") == "eviction_alone"]
    if r is None or not alone:
        return []
    if r.get("errors") or any(x.get("errors") for x in alone):
        bad = f"**errors ({r['errors'] + sum(x['errors'] for x in alone)})**"
        return [("event-loop lag p99 while evicting", "–", "< 5 ms", bad, "**missed**"),
                ("eviction CPU s per GB evicted", "–", "reported", bad, "**missed**")]
    lag = lag_summary(_merged(alone))
    p99 = lag["lag_p99_ms"]
    evicted = sum(x["evicted_bytes"] for x in alone)
    cpu = sum(x["server_cpu_s"] for x in alone)
    nocap = [x for x in records if x.get("scenario") == "eviction" and x["run"] == "no cap"]
    per_pulled = (sum(x["server_cpu_s"] for x in nocap)
                  / (sum(x["pulled_bytes"] for x in nocap) / 1e9)) if nocap else None
    return [
        ("event-loop lag p99 while evicting",
         f"during cold pulls through the cap: p99 {_num(r['capped_lag_p99_ms'])} ms; the "
         f"same pulls with no cap: {_num(r['nocap_lag_p99_ms'])} ms", "< 5 ms",
         f"{_num(p99)} ms ({lag['lag_over_5ms']} of {lag['lag_samples']} samples > 5 ms)",
         "**met**" if p99 is not None and p99 < LAG_TARGET * 1000 else "**missed**"),
        ("eviction CPU s per GB evicted",
         "the pulls themselves: " + (f"{per_pulled:.2f} CPU s per GB pulled"
                                     if per_pulled is not None else "–"),
         "reported", (f"{cpu / (evicted / 1e9):.3f} s " if evicted else "– ")
         + f"({evicted / 1e9:.2f} GB evicted alone; beside pulls: "
         f"{_num(r['cpu_s_per_gb_evicted'], '{:+.3f}')} s)", "reported"),
    ]


def _merged(group: Iterable[Record]) -> dict[float, float]:
    merged: dict[float, float] = {}
    for r in group:
        for edge, count in r["lag_buckets"].items():
            key = math.inf if edge == "+Inf" else float(edge)
            merged[key] = merged.get(key, 0.0) + count
    return merged


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def section(records: list[Record]) -> list[str]:
    runs = [r for r in records if r.get("scenario") == "eviction"]
    cost = next((r for r in records if r.get("scenario") == "eviction_cost"), None)
    if not runs or cost is None:
        return []
    rows = []
    for r in runs:
        bad = bool(r.get("errors"))
        rows.append([
            r["run"] + (f" ({r['cap_bytes'] / 1e6:.0f} MB)" if r["cap_bytes"] else ""),
            str(r["round"]), f"{r['pulled_bytes'] / 1e9:.2f}", f"{r['wall_s']:.1f}",
            f"{r['server_cpu_s']:.2f}", _num(r["cpu_s_per_gb_pulled"], "{:.3f}"),
            f"{r['evicted_bytes'] / 1e9:.2f}", str(r["evicted_objects"]),
            f"{r['far_upstream_bytes'] / 1e9:.2f}",
            _num(r["lag_p50_ms"]), _num(r["lag_p99_ms"]),
            f"{r['lag_over_5ms']} / {r['lag_samples']}", _num(r["lag_worst_bucket_ms"], "{:g}"),
            f"{r['other_cores']:.2f}",
            f"**{r['errors']}**" if bad else "0"])
    for r in (x for x in records if x.get("scenario") == "eviction_alone"):
        rows.append([
            f"eviction alone ({r['cap_bytes'] / 1e6:.0f} MB)", str(r["round"]), "–",
            f"{r['wall_s']:.1f}", f"{r['server_cpu_s']:.2f}", "–",
            f"{r['evicted_bytes'] / 1e9:.2f}", str(r["evicted_objects"]), "–",
            _num(r["lag_p50_ms"]), _num(r["lag_p99_ms"]),
            f"{r['lag_over_5ms']} / {r['lag_samples']}", _num(r["lag_worst_bucket_ms"], "{:g}"),
            "–", f"**{r['errors']}**" if r.get("errors") else "0"])
    return [
        "## 6. Eviction", "",
        f"{runs[0]['images']} images of {cost['images_bytes'] / 1e9:.2f} GB in all (random "
        f"layers, none shared), each pulled once through a fresh gateway by "
        f"{runs[0]['clients']} clients at a time, in order: once with no cap, once with "
        f"`cache: {{max_size: {cost['cap_bytes']}, lease: 0s}}`, so eviction runs through the "
        "pulls (least recently used image first). CPU is the gateway's utime + stime from "
        "/proc, from before the pulls until eviction has caught up. The cost of eviction is "
        "what the capped pulls cost beyond the same pulls with no cap, per GB evicted: "
        f"**{_num(cost['cpu_s_per_gb_evicted'], '{:.3f}')} CPU s per GB** "
        f"({cost['extra_cpu_s']:+.2f} s over {cost['evicted_bytes'] / 1e9:.2f} GB, "
        f"{cost['rounds']} round(s)); it is small beside the pulls, so the machine's noise "
        "is in it too. Event-loop lag: `gateway_event_loop_lag_seconds` (a 50 ms timer's "
        "lateness) during the pulls, from the histogram's buckets before and after; p50/p99 "
        "interpolated within a bucket as Prometheus does; \"worst\" is the upper bound of "
        "the highest bucket with a sample. The cold pulls alone load the loop (and the two "
        "cores, with the clients hashing what they receive) enough to miss 5 ms, capped or "
        "not; so the evictor's own cost is measured apart as well (\"eviction alone\"): the "
        "no-cap run's full data directory served by a gateway with the cap, which evicts it "
        "down to the low watermark while a probe sends one HEAD /v2/ every 10 ms; lag from "
        "the gateway's start (opening the cache included) until eviction settled; CPU per "
        "GB evicted is that gateway's CPU over the window per GB it evicted.", "",
        "| run | round | pulled GB | wall s | gateway CPU s | CPU s per GB pulled | "
        "evicted GB | evicted objects | far upstream GB | lag p50 ms | lag p99 ms | "
        "lag samples > 5 ms | worst lag ≤ ms | other load (cores) | errors |",
        "|" + "---|" * 15,
        *("| " + " | ".join(row) + " |" for row in rows), ""]
