"""Issue #12's warm hot-path targets besides the workers' (workers.py): a small blob GET
(the image config) at least the manifest rate, and peak RSS per process under 100 MB at
the largest C over TLS too. Rows for the targets table only; the records are scenario 3's
and 4's.
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]
RSS_LIMIT_MB = 100


def _one(records: list[Record], **match: Any) -> Record | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def _ok(r: Record | None) -> bool:
    return r is not None and not r.get("errors") and "status" not in r


def _rps(r: Record | None) -> str:
    return f"{r['rps']:,.0f}" if r is not None and _ok(r) else "?"


def _cpu(r: Record | None) -> str:
    return f"{r['cpu_s_per_1k'] * 1000:.0f}" if r is not None and _ok(r) else "?"


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    small = _one(records, scenario="manifest_rate", target="gateway", kind="GET small blob")
    manifest = _one(records, scenario="manifest_rate", target="gateway",
                    kind="GET manifest by digest")
    if small is not None:
        nginx = _one(records, scenario="manifest_rate", target="nginx", kind="GET small blob")
        met = _ok(small) and _ok(manifest) and manifest is not None and small is not None \
            and small["rps"] >= manifest["rps"]
        rows.append(("GET small blob (image config) req/s",
                     f"GET manifest by digest {_rps(manifest)} ({_cpu(manifest)} CPU ms/1k); "
                     f"nginx {_rps(nginx)}",
                     "≥ the manifest rate",
                     f"{_rps(small)} ({_cpu(small)} CPU ms/1k)",
                     "**met**" if met else "**missed**"))
    tls = [r for r in records if r.get("scenario") == "warm_throughput" and r.get("tls")
           and r.get("target") == "gateway" and "peak_rss_mb" in r]
    if tls:
        top = max(tls, key=lambda r: r["clients"])
        rows.append((f"peak RSS per process during warm TLS C={top['clients']}",
                     f"plain HTTP: {_rss(records, top['clients'])}",
                     f"< {RSS_LIMIT_MB} MB", f"{top['peak_rss_mb']:.0f} MB",
                     "**met**" if _ok(top) and top["peak_rss_mb"] < RSS_LIMIT_MB
                     else "**missed**"))
    return rows


def _rss(records: list[Record], clients: int) -> str:
    plain = _one(records, scenario="warm_throughput", target="gateway", tls=False,
                 clients=clients)
    return f"{plain['peak_rss_mb']:.0f} MB" if plain is not None and "peak_rss_mb" in plain \
        else "?"
