"""BENCHMARKS.md from the records: machine and versions, the targets with verdicts, one
table per scenario, the hand-written analysis (bench/ANALYSIS.md) and the raw JSON lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import compare, eviction, hotpath, policy, ranged, replicas, startup, workers

Record = dict[str, Any]
ANALYSIS = Path(__file__).resolve().parent / "ANALYSIS.md"


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    debian = "?"
    with contextlib.suppress(OSError):
        debian = Path("/etc/debian_version").read_text().strip()
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "debian": debian}


def _find(records: Iterable[Record], **match: Any) -> list[Record]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _one(records: Iterable[Record], **match: Any) -> Record | None:
    found = _find(records, **match)
    return found[0] if found else None


def _ok(r: Record | None) -> bool:
    return r is not None and not r.get("errors") and "status" not in r


def _cell(r: Record | None, key: str, fmt: str = "{:g}") -> str:
    if r is None:
        return "–"
    if "status" in r:
        return "not measured"
    if r.get("errors"):
        return f"**errors ({r['errors']})**"
    value = r.get(key)
    return "–" if value is None else fmt.format(value)


# ---------------------------------------------------------------- targets


def _verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    """(target, distribution/nginx reference, goal, measured, verdict) rows."""
    rows: list[tuple[str, str, str, str, str]] = []

    def add(name: str, reference: str, goal: str, measured: str, met: bool | None) -> None:
        verdict = "not measured" if met is None else ("**met**" if met else "**missed**")
        rows.append((name, reference, goal, measured, verdict))

    direct = _one(records, scenario="cold_fanin", target="direct")
    clients = sorted({r["clients"] for r in _find(records, scenario="cold_fanin",
                                                      target="gateway")})
    amps = [(c, _one(records, scenario="cold_fanin", target="gateway", clients=c))
            for c in clients]
    dist_amps = [_one(records, scenario="cold_fanin", target="distribution", clients=c)
                 for c in clients]
    if amps:
        all_ok = all(_ok(r) for _, r in amps)
        add("cold fan-in amplification, C=" + "/".join(map(str, clients)),
            "distribution " + "/".join(_cell(r, "amplification", "{:.2f}") for r in dist_amps),
            "1.00 at every C",
            "/".join(_cell(r, "amplification", "{:.3f}") for _, r in amps),
            all(r["amplification"] <= 1.005 for _, r in amps if r) if all_ok else False)
    big = max(clients) if clients else None
    gw_big = _one(records, scenario="cold_fanin", target="gateway", clients=big)
    dist_big = _one(records, scenario="cold_fanin", target="distribution", clients=big)
    if gw_big is not None and _ok(direct):
        assert direct is not None
        ratio = gw_big["wall_s"] / direct["wall_s"] if _ok(gw_big) else None
        add(f"cold fan-in wall time, C={big}",
            f"distribution {_cell(dist_big, 'wall_s', '{:.1f} s')} "
            f"(direct {direct['wall_s']:.1f} s)",
            "≤ 1.2× one direct pull",
            f"{_cell(gw_big, 'wall_s', '{:.1f} s')}"
            + (f" = {ratio:.2f}× direct" if ratio else ""),
            ratio is not None and ratio <= 1.2)
    t_direct = _one(records, scenario="cold_ttfb", target="direct")
    t_gw = _one(records, scenario="cold_ttfb", target="gateway")
    t_dist = _one(records, scenario="cold_ttfb", target="distribution")
    if t_gw is not None and _ok(t_direct) and t_direct and t_direct["median_s"]:
        delta = t_gw["median_s"] - t_direct["median_s"] if _ok(t_gw) else None
        add("first byte of a cold blob, far upstream",
            f"distribution {_cell(t_dist, 'median_s', '{:.3f} s')} "
            f"(direct {t_direct['median_s']:.3f} s)",
            "within 50 ms of direct",
            _cell(t_gw, "median_s", "{:.3f} s") + (f" ({delta * 1000:+.0f} ms)"
                                                  if delta is not None else ""),
            delta is not None and delta <= 0.050)
    warm_c = sorted({r["clients"] for r in _find(records, scenario="warm_throughput",
                                                 target="gateway", tls=False)})
    gbps = []
    for c in warm_c:
        g = _one(records, scenario="warm_throughput", target="gateway", tls=False, clients=c)
        n = _one(records, scenario="warm_throughput", target="nginx", tls=False, clients=c)
        d = _one(records, scenario="warm_throughput", target="distribution", tls=False,
                 clients=c)
        gbps.append((c, g, n, d))
    if gbps:
        def ratio_text(key: str) -> tuple[str, list[float | None]]:
            values = [g[key] / n[key] if g is not None and n is not None and _ok(g)
                      and _ok(n) and n[key] else None for _, g, n, _ in gbps]
            return "/".join(f"{v:.2f}" if v is not None else "?" for v in values), values
        text, values = ratio_text("gb_per_s")
        add("warm GB/s, plain HTTP, C=" + "/".join(str(c) for c, *_ in gbps),
            "distribution " + "/".join(_cell(d, "gb_per_s", "{:.2f}") for *_, d in gbps)
            + "; nginx " + "/".join(_cell(n, "gb_per_s", "{:.2f}") for _, _, n, _ in gbps),
            "≥ 0.9× nginx",
            "/".join(_cell(g, "gb_per_s", "{:.2f}") for _, g, _, _ in gbps)
            + f" = {text}× nginx",
            all(v is not None and v >= 0.9 for v in values))
        text, values = ratio_text("cpu_s_per_gb")
        add("warm CPU s per GB, plain HTTP, C=" + "/".join(str(c) for c, *_ in gbps),
            "distribution " + "/".join(_cell(d, "cpu_s_per_gb", "{:.2f}") for *_, d in gbps)
            + "; nginx " + "/".join(_cell(n, "cpu_s_per_gb", "{:.2f}") for _, _, n, _ in gbps),
            "≤ 1.5× nginx",
            "/".join(_cell(g, "cpu_s_per_gb", "{:.2f}") for _, g, _, _ in gbps)
            + f" = {text}× nginx",
            all(v is not None and v <= 1.5 for v in values))
    for kind, factor in (("GET manifest by digest", 10), ("GET manifest by tag", 40)):
        g = _one(records, scenario="manifest_rate", target="gateway", kind=kind)
        d = _one(records, scenario="manifest_rate", target="distribution", kind=kind)
        n = _one(records, scenario="manifest_rate", target="nginx", kind=kind)
        if g is None:
            continue
        ratio = g["rps"] / d["rps"] if _ok(g) and _ok(d) and d and d["rps"] else None
        add(f"{kind} req/s (16 connections)",
            f"distribution {_cell(d, 'rps', '{:,.0f}')}"
            + (f"; nginx {_cell(n, 'rps', '{:,.0f}')}" if n else ""),
            f"≥ {factor}× distribution",
            _cell(g, "rps", "{:,.0f}") + (f" = {ratio:.1f}× distribution" if ratio else ""),
            ratio is not None and ratio >= factor if d is not None else None)
        if kind.endswith("by tag"):
            add("upstream requests per 1k tag requests within TTL",
                f"distribution {_cell(d, 'upstream_per_1k', '{:,.0f}')}", "0",
                _cell(g, "upstream_per_1k", "{:g}"),
                _ok(g) and g["upstream_per_1k"] == 0)
    g32 = [r for r in _find(records, scenario="warm_throughput", target="gateway", tls=False)
           if r.get("clients") == max(warm_c, default=0)]
    if g32:
        g = g32[0]
        d = _one(records, scenario="warm_throughput", target="distribution", tls=False,
                 clients=g["clients"])
        n = _one(records, scenario="warm_throughput", target="nginx", tls=False,
                 clients=g["clients"])
        add(f"peak RSS during warm C={g['clients']}",
            f"distribution {_cell(d, 'peak_rss_mb', '{:.0f} MB')}; "
            f"nginx {_cell(n, 'peak_rss_mb', '{:.0f} MB')}",
            "< 150 MB", _cell(g, "peak_rss_mb", "{:.0f} MB"),
            _ok(g) and g["peak_rss_mb"] < 150)
    tls = _one(records, scenario="warm_throughput", target="gateway", tls=True)
    if tls is not None and "status" in tls:
        add("warm serving over TLS", "see scenario 3", "measured", "–", None)
    rows += eviction.verdicts(records) + startup.verdicts(records) + ranged.verdicts(records)
    rows += policy.verdicts(records) + workers.verdicts(records) + replicas.verdicts(records)
    rows += hotpath.verdicts(records)
    against = compare.verdict(records)
    if against is not None:
        add(*against)
    return rows


# ---------------------------------------------------------------- tables


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _requests(r: Record | None) -> str:
    if r is None or not r.get("upstream_requests"):
        return "–"
    reqs = r["upstream_requests"]
    return ", ".join(f"{k} {v}" for k, v in sorted(reqs.items()))


def markdown(records: list[Record]) -> str:
    meta = records[0]
    m, v, p = meta["machine"], meta["versions"], meta["parameters"]
    image_mb = meta["image"]["size"] / 1e6
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/, `python -m bench`); do not edit by hand: the analysis "
        "at the end comes from bench/ANALYSIS.md.",
        "",
        f"- command: `{meta['command']}` ({meta['profile']} profile), started "
        f"{meta['started']}, took {meta['duration_s'] / 60:.1f} min",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Debian {m['debian']}",
        f"- gateway: {v['gateway']} at commit {v.get('gateway_commit', '?')} (Python "
        f"{v['python']}, aiohttp {v['aiohttp']}), run as `python -m gateway serve` with the "
        "default log level (one JSON access-log line per request, to a file)",
        *_baseline_line(meta),
        f"- distribution: {v['distribution']}, proxy mode (`proxy: remoteurl:`), filesystem "
        f"storage; nginx: {v['nginx']} (`worker_processes auto`, sendfile); "
        f"clients and proxies: bench/benchtool ({v['go']})",
        f"- image: {meta['image_layers']} layers + config, {image_mb:.0f} MB of random "
        f"(incompressible) bytes; cold blob for scenario 2: {meta['ttfb_blob_bytes'] / 1e6:.0f} MB",
        f"- far upstream: distribution 2.8 with Bearer token auth behind a proxy adding "
        f"{p['latency_ms']:g} ms per request (and per new connection) and pacing each connection "
        f"to {p['rate_mb']:g} MB/s; it serves the token endpoint too",
        "- everything runs on this one machine over loopback: the clients and proxies share "
        "its cores with the server under test. \"Other load\" is CPU that neither the server, "
        "the client nor the far upstream used during a measurement (other work on the "
        "machine), in cores out of "
        f"{m['cores']}; before each window the bench waits (bounded) for it to fall below 0.3. "
        "Where it is high, speeds are low and CPU per GB/request is the steadier number",
        "",
        "## Targets",
        "",
        _table(["what", "reference (this run)", "gateway target", "gateway measured",
                "verdict"], [list(row) for row in _verdicts(records)]),
        "",
    ]
    out += _scenario1(records, image_mb)
    out += _scenario2(records)
    out += _scenario3(records)
    out += _scenario4(records)
    out += _scenario5(records)
    out += eviction.section(records)
    out += startup.section(records)
    out += ranged.section(records)
    out += policy.section(records)
    out += replicas.section(records)
    out += compare.section(records)
    if ANALYSIS.exists():
        out += ["", ANALYSIS.read_text().rstrip(), ""]
    out += ["", "## Raw results", "", "<details><summary>JSON lines (also in bench/results/)"
            "</summary>", "", "```json"]
    out += [json.dumps(r) for r in records]
    out += ["```", "", "</details>", ""]
    return "\n".join(out)


def _baseline_line(meta: Record) -> list[str]:
    b = meta.get("baseline")
    if not b:
        return []
    return [f"- baseline: {b['version']} at commit {b['commit'][:12]} (`--baseline {b['rev']}`, "
            f"reported as \"{b['label']}\"), from a temporary git worktree, same Python; "
            "measured beside the gateway in scenarios 3 (plain HTTP) and 4, see the section "
            "\"This tree against\" below"]


def _scenario1(records: list[Record], image_mb: float) -> list[str]:
    rows = []
    direct = _one(records, scenario="cold_fanin", target="direct")
    if direct is None:
        return []
    rows.append(["direct from the far upstream", "1", _cell(direct, "wall_s", "{:.2f}"),
                 "1.00×", _cell(direct, "amplification", "{:.3f}"), "–", "–", "–", "–",
                 _requests(direct)])
    for r in records:
        if r.get("scenario") != "cold_fanin" or r["target"] == "direct":
            continue
        ratio = f"{r['wall_s'] / direct['wall_s']:.2f}×" if _ok(r) and _ok(direct) else "–"
        rows.append([r["target"], str(r["clients"]), _cell(r, "wall_s", "{:.2f}"), ratio,
                     _cell(r, "amplification", "{:.3f}"), _cell(r, "server_cpu_s", "{:.1f}"),
                     _cell(r, "client_cpu_s", "{:.1f}"),
                     _cell(r, "peak_rss_mb", "{:.0f}"), _cell(r, "other_cores", "{:.2f}"),
                     _requests(r)])
    return [
        "## 1. Cold fan-in",
        "",
        f"C clients pull the {image_mb:.0f} MB image at once from a cold cache through the far "
        "upstream; each client resolves the tag, then fetches config and layers with 3 "
        "parallel connections (dockerd's default) and verifies every digest. Wall time is until "
        "the last client finishes; amplification is the bytes the far upstream sent divided "
        "by the image size.",
        "",
        _table(["server", "C", "wall s", "vs direct", "amplification", "server CPU s",
                "clients' CPU s", "peak RSS MB", "other load (cores)", "upstream requests"],
               rows),
        "",
    ]


def _scenario2(records: list[Record]) -> list[str]:
    rows = []
    for r in _find(records, scenario="cold_ttfb"):
        rows.append([r["target"], _cell(r, "median_s", "{:.3f}"),
                     ", ".join(f"{s:.3f}" for s in r["ttfb_s"]),
                     _cell(r, "full_s", "{:.2f}"), "yes" if r.get("verified") else "no"])
    if not rows:
        return []
    return [
        "## 2. Time to first byte of a cold blob",
        "",
        "A new client (new connection, no token yet) GETs a cold blob; the clock stops at the "
        "first body byte. Each sample starts a new server with an empty cache. The last sample "
        "reads the whole blob and verifies its digest (\"whole blob s\").",
        "",
        _table(["server", "median s", "samples s", "whole blob s", "digest verified"], rows),
        "",
    ]


def _scenario3(records: list[Record]) -> list[str]:
    if not _find(records, scenario="warm_throughput"):
        return []
    out = ["## 3. Warm throughput", "",
           "C keep-alive connections pull the cached image (manifest by digest, config, layers) "
           "over and over for a fixed window. The client discards bodies in the kernel "
           "(splice to /dev/null) and hashes 1 response in 64 (and every manifest) to verify "
           "its digest; every response's status, length and digest header are checked. CPU is "
           "the server's utime + stime from /proc over the window (nginx: master and workers). "
           "nginx serves the gateway's own cached files (hard links).", ""]
    for tls in (False, True):
        rows = []
        clients = sorted({r["clients"] for r in _find(records, scenario="warm_throughput",
                                                      tls=tls) if "clients" in r})
        for c in clients:
            g = _one(records, scenario="warm_throughput", target="gateway", tls=tls, clients=c)
            if g is None:
                g = _one(records, scenario="warm_throughput", target="gateway", tls=tls)
            d = _one(records, scenario="warm_throughput", target="distribution", tls=tls,
                     clients=c)
            n = _one(records, scenario="warm_throughput", target="nginx", tls=tls, clients=c)
            ratio = (f"{g['gb_per_s'] / n['gb_per_s']:.2f}×" if _ok(g) and _ok(n)
                     and g is not None and n is not None else "–")
            rows.append([str(c), _cell(g, "gb_per_s", "{:.2f}"), _cell(d, "gb_per_s", "{:.2f}"),
                         _cell(n, "gb_per_s", "{:.2f}"), ratio,
                         _cell(g, "cpu_s_per_gb", "{:.3f}"), _cell(d, "cpu_s_per_gb", "{:.3f}"),
                         _cell(n, "cpu_s_per_gb", "{:.3f}"),
                         "/".join(_cell(x, "client_cpu_s", "{:.1f}") for x in (g, d, n)),
                         "/".join(_cell(x, "other_cores", "{:.1f}") for x in (g, d, n))])
        if rows:
            out += [f"**{'TLS' if tls else 'Plain HTTP'}**", "",
                    _table(["C", "gateway GB/s", "distribution GB/s", "nginx GB/s",
                            "gateway / nginx", "gateway CPU s/GB", "distribution CPU s/GB",
                            "nginx CPU s/GB", "client CPU s (g/d/n)",
                            "other load, cores (g/d/n)"], rows), ""]
        status = _one(records, scenario="warm_throughput", target="gateway", tls=tls)
        if status is not None and "status" in status:
            out += [f"Gateway over TLS: {status['status']}.", ""]
    return out


def _scenario4(records: list[Record]) -> list[str]:
    rows = []
    for r in _find(records, scenario="manifest_rate"):
        rows.append([r["kind"], r["target"], _cell(r, "rps", "{:,.0f}"),
                     _cell(r, "p50_ms", "{:.2f}"), _cell(r, "p99_ms", "{:.2f}"),
                     _cell(r, "cpu_s_per_1k", "{:.3f}"), _cell(r, "upstream_per_1k", "{:g}"),
                     _cell(r, "other_cores", "{:.2f}")])
    for r in _find(records, scenario="wrk_crosscheck"):
        rows.append([f"{r.get('kind', 'GET manifest by digest')} (wrk)", r["target"],
                     _cell(r, "rps", "{:,.0f}"), _cell(r, "p50_ms", "{:.2f}"),
                     _cell(r, "p99_ms", "{:.2f}"), _cell(r, "cpu_s_per_1k", "{:.3f}"), "–",
                     "–"])
    if not rows:
        return []
    return ["## 4. Manifest and HEAD rate", "",
            "16 keep-alive connections, warm cache (tag within its TTL), for a fixed window. "
            "Every GET body is hashed and checked; HEADs are checked by length and digest "
            "header. Upstream requests per 1k counts every request the far upstream saw "
            "(token, ping, manifests, blobs). The (wrk) rows are the same load from wrk, "
            "checking status and digest header in Lua (not hashing bodies): a lighter load "
            "generator, to show where the Go client is what limits the rate; each is the "
            "median of its windows (`round_rps` in the results), the CPU of all of them.", "",
            _table(["request", "server", "req/s", "p50 ms", "p99 ms", "server CPU s per 1k",
                    "upstream requests per 1k", "other load (cores)"], rows), ""]


def _scenario5(records: list[Record]) -> list[str]:
    phases: dict[str, dict[str, str]] = {}
    for r in _find(records, scenario="memory"):
        phases.setdefault(r["phase"], {})[r["target"]] = f"{r['peak_rss_mb']:.0f}"
    if not phases:
        return []
    base = compare.label(records)
    columns = ["gateway", *([base] if base else []), "distribution", "nginx"]
    rows = [[phase, *(by.get(c, "–") for c in columns)] for phase, by in phases.items()]
    return ["## 5. Memory", "",
            "Peak RSS (VmHWM from /proc/<pid>/status, MB; reset through clear_refs before each "
            "warm window; a cold run is a fresh process). nginx: master plus workers.", "",
            _table(["phase", *(f"{c} MB" for c in columns)], rows), ""]


Formatter = Callable[[Record], str]
