"""The report's side-by-side of this tree's gateway and a baseline revision's (`--baseline`):
a row for the targets table and a section with both gateways' CPU per warm GB and per
manifest request from the same run. Reads records only; measures nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

Record = dict[str, Any]

# "No worse", as the issue says. Mind the noise of one run on a shared 2-core machine:
# the same code measured against itself, interleaved in rounds, came out 0.89-1.06x in
# total and 0.6-1.3x in single windows (quick profile, other jobs running).
TOLERANCE = 1.00
MANIFEST_KINDS = ("GET manifest by digest", "GET manifest by tag")


def _find(records: Iterable[Record], **match: Any) -> list[Record]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _one(records: Iterable[Record], **match: Any) -> Record | None:
    found = _find(records, **match)
    return found[0] if found else None


def _ok(r: Record | None) -> bool:
    return r is not None and not r.get("errors") and "status" not in r


def label(records: list[Record]) -> str | None:
    """The baseline's target name ("gateway (<commit>)"), if the run had one."""
    baseline = records[0].get("baseline") if records else None
    return str(baseline["label"]) if baseline else None


def _warm_pairs(records: list[Record], base: str) -> list[tuple[int, Record | None,
                                                                 Record | None]]:
    clients = sorted({r["clients"] for r in _find(records, scenario="warm_throughput",
                                                  target=base, tls=False)})
    return [(c, _one(records, scenario="warm_throughput", target="gateway", tls=False,
                     clients=c),
             _one(records, scenario="warm_throughput", target=base, tls=False, clients=c))
            for c in clients]


def _per_gb(windows: list[Record | None], cpu: Callable[[Record], float] | None = None,
            ) -> float | None:
    """Total CPU over total GB of the windows: steadier than any one window. `cpu`: what
    to count of a window (default: the server's)."""
    if not windows or not all(_ok(w) for w in windows):
        return None
    count = cpu or (lambda w: float(w["server_cpu_s"]))
    gb = sum(w["gb"] for w in windows if w is not None)
    return sum(count(w) for w in windows if w is not None) / gb if gb else None


def _machine_cpu(w: Record) -> float:
    """All the machine's CPU in a window: the server's, the load generator's, the rest.
    On loopback the kernel's work for one transfer (the sender's TCP, the receiver's,
    their softirqs) lands on whichever process runs when it is done, so two servers that
    cost the machine the same can be charged different shares of it."""
    return float(w["server_cpu_s"] + w["client_cpu_s"] + w["other_cpu_s"])


def _ratio(current: float | None, base: float | None) -> float | None:
    return current / base if current is not None and base else None


def _fmt(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _ms(r: Record | None) -> float | None:
    """Server CPU ms per request (= CPU s per 1k requests)."""
    return float(r["cpu_s_per_1k"]) if _ok(r) and r is not None else None


def verdict(records: list[Record]) -> tuple[str, str, str, str, bool | None] | None:
    """(what, reference, goal, measured, met) for the targets table, or None without a
    baseline."""
    base = label(records)
    if base is None:
        return None
    rev = base.removeprefix("gateway (").removesuffix(")")
    pairs = _warm_pairs(records, base)
    cur_gb = _per_gb([g for _, g, _ in pairs])
    base_gb = _per_gb([b for _, _, b in pairs])
    cur_ms = [_ms(_one(records, scenario="manifest_rate", target="gateway", kind=k))
              for k in MANIFEST_KINDS]
    base_ms = [_ms(_one(records, scenario="manifest_rate", target=base, kind=k))
               for k in MANIFEST_KINDS]
    ratios = [_ratio(cur_gb, base_gb),
              *(_ratio(c, b) for c, b in zip(cur_ms, base_ms, strict=True))]
    measured = (f"{_fmt(cur_gb, '{:.3f}')} s/GB = {_fmt(ratios[0], '{:.2f}')}×; "
                + "/".join(_fmt(v, "{:.3f}") for v in cur_ms) + " ms = "
                + "/".join(_fmt(v, "{:.2f}") for v in ratios[1:]) + "×")
    reference = (f"{base} {_fmt(base_gb, '{:.3f}')} s/GB (C="
                 + "/".join(str(c) for c, *_ in pairs) + "); "
                 + "/".join(_fmt(v, "{:.3f}") for v in base_ms) + " ms per GET manifest "
                 "by digest/tag")
    met = None if not pairs else all(r is not None and r <= TOLERANCE for r in ratios)
    return (f"CPU per warm GB and per manifest request vs {rev}", reference,
            f"no worse: ≤ {TOLERANCE:.2f}× {rev}", measured, met)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(r: Record | None, key: str, fmt: str) -> str:
    if r is None:
        return "–"
    if r.get("errors"):
        return f"**errors ({r['errors']})**"
    return _fmt(r.get(key), fmt)


def _spread(g: Record | None, b: Record | None, key: str, fmt: str) -> str:
    """Each round's value, this tree's | the baseline's: how far one window can move."""
    def one(r: Record | None) -> str:
        values = (r or {}).get(key) or []
        return " ".join(fmt.format(v) for v in values if v is not None) or "–"
    return f"{one(g)} \\| {one(b)}"


def _warm_table(records: list[Record], base: str) -> list[list[str]]:
    rows = []
    pairs = _warm_pairs(records, base)
    for c, g, b in pairs:
        rows.append([str(c), _cell(g, "gb_per_s", "{:.2f}"), _cell(b, "gb_per_s", "{:.2f}"),
                     _cell(g, "cpu_s_per_gb", "{:.3f}"), _cell(b, "cpu_s_per_gb", "{:.3f}"),
                     _fmt(_ratio(g["cpu_s_per_gb"] if _ok(g) and g else None,
                                 b["cpu_s_per_gb"] if _ok(b) and b else None), "{:.2f}×"),
                     _spread(g, b, "round_cpu_s_per_gb", "{:.3f}"),
                     f"{_cell(g, 'other_cores', '{:.2f}')}/{_cell(b, 'other_cores', '{:.2f}')}",
                     _machine_cells([g], [b])])
    cur, old = _per_gb([g for _, g, _ in pairs]), _per_gb([b for _, _, b in pairs])
    if pairs:
        rows.append(["all (total CPU / total GB)", "", "", _fmt(cur, "**{:.3f}**"),
                     _fmt(old, "**{:.3f}**"), _fmt(_ratio(cur, old), "**{:.2f}×**"), "", "",
                     _machine_cells([g for _, g, _ in pairs], [b for _, _, b in pairs])])
    return rows


def _machine_cells(g: list[Record | None], b: list[Record | None]) -> str:
    cur, old = _per_gb(g, _machine_cpu), _per_gb(b, _machine_cpu)
    return (f"{_fmt(cur, '{:.3f}')} / {_fmt(old, '{:.3f}')} = "
            f"{_fmt(_ratio(cur, old), '{:.2f}×')}")


def _rate_table(records: list[Record], base: str) -> list[list[str]]:
    rows = []
    for g in _find(records, scenario="manifest_rate", target="gateway"):
        b = _one(records, scenario="manifest_rate", target=base, kind=g["kind"])
        if b is None:
            continue
        ratio = _fmt(_ratio(_ms(g), _ms(b)), "{:.2f}×")
        bold = g["kind"] in MANIFEST_KINDS
        rows.append([g["kind"], _cell(g, "rps", "{:,.0f}"), _cell(b, "rps", "{:,.0f}"),
                     _cell(g, "cpu_s_per_1k", "{:.3f}"), _cell(b, "cpu_s_per_1k", "{:.3f}"),
                     f"**{ratio}**" if bold and ratio != "–" else ratio,
                     _spread(g, b, "round_cpu_s_per_1k", "{:.3f}"),
                     f"{_cell(g, 'other_cores', '{:.2f}')}/{_cell(b, 'other_cores', '{:.2f}')}"])
    return rows


def section(records: list[Record]) -> list[str]:
    """The Markdown section, or nothing without a baseline."""
    base = label(records)
    if base is None:
        return []
    info = records[0]["baseline"]
    short = base.removeprefix("gateway (").removesuffix(")")
    rounds = int(records[0].get("parameters", {}).get("pair_rounds", 1))
    times = "once" if rounds == 1 else f"{rounds} times"
    out = [f"## This tree against {short}", "",
           f"`{base}` is the gateway at {info['commit']} (`--baseline {info['rev']}`, "
           f"{info['version']}), checked out into a temporary git worktree and run like this "
           "tree: the same Python and packages, `python -m gateway serve` with cwd and "
           "PYTHONPATH = that worktree (checked to import that worktree's gateway/), its own "
           "data directory, warmed the same way. Both gateways are up at once. Each window "
           f"of scenarios 3 (plain HTTP) and 4 runs {times} on each, alternating which "
           "goes first (A B, B A, ...), so both see the same machine; a row is the total over "
           "its rounds (CPU over GB or over requests), and the per-round values show how far "
           "one window moves. CPU is counted per process, so the idle gateway costs the "
           "measured one nothing. A ratio above 1 means this tree uses more CPU than the "
           "baseline.", ""]
    warm = _warm_table(records, base)
    if warm:
        out += ["**Warm throughput, plain HTTP**", "", _table(*_per_round(rounds, [
            "C", "gateway GB/s", f"{base} GB/s", "gateway CPU s/GB", f"{base} CPU s/GB",
            "CPU ratio", "CPU s/GB per round (g \\| b)", "other load, cores (g/b)",
            "machine CPU s/GB, all processes (g / b)"], warm)), "",
            "The last column is all the machine's CPU per GB (gateway, load generator, the "
            "rest): on loopback the kernel's work for a transfer is charged to whichever "
            "process runs when it is done, so the gateway's own column can move while the "
            "machine's cost does not.", ""]
    rate = _rate_table(records, base)
    if rate:
        out += ["**Manifest and HEAD rate** (server CPU ms per request = CPU s per 1k)", "",
                _table(*_per_round(rounds, [
                    "request", "gateway req/s", f"{base} req/s", "gateway CPU ms/request",
                    f"{base} CPU ms/request", "CPU ratio", "CPU ms/request per round (g \\| b)",
                    "other load, cores (g/b)"], rate)), ""]
    return out


def _per_round(rounds: int, header: list[str], rows: list[list[str]],
               ) -> tuple[list[str], list[list[str]]]:
    """Without rounds there is nothing per round to show: drop that column (the 7th)."""
    if rounds > 1:
        return header, rows
    return header[:6] + header[7:], [row[:6] + row[7:] for row in rows]
