"""`serve --workers N` in the bench: the warm scenarios (3, 4) against the gateway with N
worker processes as one more target, `gateway-wN`, and its rows in the targets table
(issue #12: manifest rate ≥ 1.7× one worker and ≥ 0.25× nginx; warm GB/s ≥ 0.9× nginx).
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]
PREFIX = "gateway-w"
RATE_VS_ONE, RATE_VS_NGINX, GBPS_VS_NGINX = 1.7, 0.25, 0.9


def target(workers: int) -> str:
    return f"{PREFIX}{workers}"


def workers_of(name: str) -> int | None:
    """N for a `gateway-wN` target, None for any other."""
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def _one(records: list[Record], **match: Any) -> Record | None:
    return next((r for r in records if all(r.get(k) == v for k, v in match.items())), None)


def _ok(r: Record | None) -> bool:
    return r is not None and not r.get("errors") and "status" not in r


def _ratio(a: Record | None, b: Record | None, key: str) -> float | None:
    if not (_ok(a) and _ok(b)) or not b or not b.get(key):
        return None
    assert a is not None
    return float(a[key]) / float(b[key])


def _text(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _rps(r: Record | None) -> str:
    return f"{r['rps']:,.0f}" if r is not None and _ok(r) else "?"


Rates = tuple[Record, float | None, float | None, Record | None, Record | None]


def _rates(records: list[Record], scenario: str, name: str, kind: str) -> Rates | None:
    """`name`'s rate of `kind` from one load generator, with its ratios to one worker
    and to nginx's GET by digest (nginx serves manifests by digest only) from the same."""
    many = _one(records, scenario=scenario, target=name, kind=kind)
    if many is None:
        return None
    one = _one(records, scenario=scenario, target="gateway", kind=kind)
    nginx = _one(records, scenario=scenario, target="nginx", kind="GET manifest by digest")
    return many, _ratio(many, one, "rps"), _ratio(many, nginx, "rps"), one, nginx


def _rates_text(rates: Rates) -> str:
    many, vs_one, vs_nginx, _, _ = rates
    return f"{_rps(many)} = {_text(vs_one)}× 1 worker, {_text(vs_nginx)}× nginx"


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    names = sorted({r["target"] for r in records if isinstance(r.get("target"), str)
                    and workers_of(r["target"]) is not None})
    for name in names:
        n = workers_of(name)
        for kind in ("GET manifest by digest", "GET manifest by tag"):
            go = _rates(records, "manifest_rate", name, kind)
            light = _rates(records, "wrk_crosscheck", name, kind)
            if go is None:
                continue
            # The verdict goes by the lighter load generator when there is one: on 2
            # cores the Go client's share (it hashes every body) is taken from the workers.
            judged = light if light is not None else go
            vs_one, vs_nginx = judged[1], judged[2]
            met = vs_one is not None and vs_one >= RATE_VS_ONE and vs_nginx is not None \
                and vs_nginx >= RATE_VS_NGINX
            text = "Go client " + _rates_text(go)
            if light is not None:
                text += "; wrk " + _rates_text(light) + " (judged by wrk)"
            rows.append((
                f"{kind} req/s with --workers {n}",
                f"1 worker {_rps(go[3])}; nginx {_rps(go[4])} (Go client)",
                f"≥ {RATE_VS_ONE}× 1 worker, ≥ {RATE_VS_NGINX}× nginx",
                text, "**met**" if met else "**missed**"))
        clients = sorted({r["clients"] for r in records if r.get("scenario") ==
                          "warm_throughput" and r.get("target") == name and not r.get("tls")})
        if not clients:
            continue
        ratios = [_ratio(_one(records, scenario="warm_throughput", target=name, tls=False,
                              clients=c),
                         _one(records, scenario="warm_throughput", target="nginx", tls=False,
                              clients=c), "gb_per_s") for c in clients]
        measured = [_one(records, scenario="warm_throughput", target=name, tls=False,
                         clients=c) for c in clients]
        rows.append((
            f"warm GB/s, plain HTTP, --workers {n}, C=" + "/".join(map(str, clients)),
            "nginx (same run)", f"≥ {GBPS_VS_NGINX}× nginx",
            "/".join(str(m["gb_per_s"]) if _ok(m) and m else "?" for m in measured)
            + " = " + "/".join(_text(v) for v in ratios) + "× nginx",
            "**met**" if all(v is not None and v >= GBPS_VS_NGINX for v in ratios)
            else "**missed**"))
    return rows
