"""A gateway measured beside its baseline: the order the two run each window in, and
several rounds of one window folded into one record (totals, so the report's columns
keep their meaning). One server, one round: the record is returned as it was measured.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any, TypeVar

Record = dict[str, Any]
T = TypeVar("T")


def interleaved(servers: Sequence[T], turn: int) -> list[T]:
    """The servers in the order to measure turn `turn` in: the two gateways take turns
    going first (A B, B A, A B...), so drift on the machine falls on both alike."""
    return list(servers) if turn % 2 == 0 else list(reversed(servers))


def _common(runs: list[Record]) -> Record:
    seconds = sum(r["seconds"] for r in runs)
    other = sum(r["other_cpu_s"] for r in runs)
    merged = dict(runs[0])
    merged.update({
        "seconds": round(seconds, 3),
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in runs), 2),
        "other_cpu_s": round(other, 2),
        "other_cores": round(other / seconds, 2) if seconds else 0.0,
        "responses": sum(r["responses"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "error_samples": [s for r in runs for s in r["error_samples"]][:5],
        "rounds": len(runs)})
    return merged


def merge_warm(runs: list[Record]) -> Record:
    """Rounds of one warm-throughput window: GB/s and CPU per GB over all of them."""
    if len(runs) == 1:
        return runs[0]
    merged = _common(runs)
    gigabytes = sum(r["gb"] for r in runs)
    cpu = sum(r["server_cpu_s"] for r in runs)
    merged.update({
        "gb": round(gigabytes, 3),
        "gb_per_s": round(gigabytes / merged["seconds"], 3) if merged["seconds"] else 0.0,
        "server_cpu_s": round(cpu, 2),
        "cpu_s_per_gb": round(cpu / gigabytes, 3) if gigabytes else None,
        "verified": sum(r["verified"] for r in runs),
        "upstream_requests": sum(r["upstream_requests"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "round_gb_per_s": [r["gb_per_s"] for r in runs],
        "round_cpu_s_per_gb": [r["cpu_s_per_gb"] for r in runs]})
    return merged


def merge_rate(runs: list[Record]) -> Record:
    """Rounds of one manifest-rate window: req/s and CPU per request over all of them;
    p50 is the rounds' median, p99 their worst."""
    if len(runs) == 1:
        return runs[0]
    merged = _common(runs)
    responses = max(merged["responses"], 1)
    cpu = sum(r["cpu_s_per_1k"] * max(r["responses"], 1) / 1000 for r in runs)
    upstream = sum(r["upstream_requests"] for r in runs)
    merged.update({
        "rps": round(merged["responses"] / merged["seconds"], 1) if merged["seconds"] else 0.0,
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "cpu_s_per_1k": round(cpu / responses * 1000, 4),
        "upstream_requests": upstream,
        "upstream_per_1k": round(upstream / responses * 1000, 2),
        "round_rps": [r["rps"] for r in runs],
        "round_cpu_s_per_1k": [r["cpu_s_per_1k"] for r in runs]})
    return merged
