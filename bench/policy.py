"""Scenario 9, the cost of access rules and limits: the same tree served twice, once as
shipped and once with an allow-list of 1,000 CIDRs, 100 repository globs and per-IP
limits (set high enough never to refuse the bench's client), measured in alternating
rounds: warm GB/s and manifest requests per second. Target: within 10% of the run
without them. Also this scenario's rows in the targets table and its section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
from typing import Any

from .scenarios import REPO_NAME, Profile, _warmed, manifest_rate, warm_throughput
from .servers import Server, World, far_upstream, gateway

Record = dict[str, Any]
PLAIN, POLICIES = "gateway", "gateway (policies)"
CIDRS, GLOBS = 1000, 100
TOLERANCE = 0.90  # "within 10%": the policies gateway does at least 0.9x the plain one
WARM_CLIENTS = 8
RATE_KINDS = ("GET manifest by digest", "GET manifest by tag")


def policy_config() -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level sections, route keys): 999 other networks and loopback allowed, 99
    other repository globs and the bench's, per-IP limits no bench load reaches."""
    others = [str(ipaddress.ip_network((0x0A000000 + (n << 8), 24)))
              for n in range(CIDRS - 1)]
    globs = [f"team{n:02d}/*" for n in range(GLOBS - 1)] + [REPO_NAME.split("/")[0] + "/*"]
    sections = {
        "access": {"allow": [*others, "127.0.0.0/8"], "anonymous": [*others, "127.0.0.0/8"]},
        # Loopback is exempt by default: not here, so every request goes through buckets.
        "limits": {"requests_per_second": 1_000_000, "requests_burst": 1_000_000,
                   "bytes_per_second": "100GiB", "bytes_burst": "1GiB",
                   "misses_per_minute": 1_000_000, "misses_burst": 1_000_000,
                   "connections_per_ip": 10_000, "exempt": []},
    }
    return sections, {"repositories": {"allow": globs}}


def run(world: World, profile: Profile) -> list[Record]:
    """Both gateways warm and up at once (an idle one costs the measured one no CPU)."""
    sections, route = policy_config()
    records: list[Record] = []
    launchers = [(gateway, PLAIN),
                 (functools.partial(gateway, sections=sections, route=route, label=POLICIES),
                  "policies")]
    with far_upstream(world, latency_ms=profile.latency_ms, rate_mb=profile.rate_mb) as far, \
            contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for launcher, slug in launchers:
            data = world.fresh_dir(f"policy-{slug}")
            server, info = stack.enter_context(_warmed(world, far, launcher, slug, data))
            records.append({"scenario": "policy_setup", **info})
            servers.append(server)
        one_c = dataclasses.replace(profile, warm_clients=(WARM_CLIENTS,))
        for record in warm_throughput(world, one_c, servers, far, tls=False):
            records.append({**record, "scenario": "policy_warm"})
        for record in manifest_rate(world, profile, servers, far, kinds=RATE_KINDS):
            records.append({**record, "scenario": "policy_rate"})
    return records


# ---------------------------------------------------------------- report


def _pair(records: list[Record], scenario: str, **match: Any) -> tuple[Record | None, ...]:
    found = {r["target"]: r for r in records if r.get("scenario") == scenario
             and all(r.get(k) == v for k, v in match.items())}
    return found.get(PLAIN), found.get(POLICIES)


def _ratio(plain: Record | None, policies: Record | None, key: str) -> float | None:
    if not plain or not policies or plain.get("errors") or policies.get("errors"):
        return None
    return policies[key] / plain[key] if plain.get(key) else None


def _ratios(records: list[Record]) -> list[tuple[str, Record | None, Record | None, str]]:
    rows = [(f"warm GB/s, C={WARM_CLIENTS}", *_pair(records, "policy_warm"), "gb_per_s")]
    rows += [(f"{kind} req/s", *_pair(records, "policy_rate", kind=kind), "rps")
             for kind in RATE_KINDS]
    return rows


def verdicts(records: list[Record]) -> list[tuple[str, str, str, str, str]]:
    rows = _ratios(records)
    if not any(plain for _, plain, _, _ in rows):
        return []
    ratios = [_ratio(plain, pol, key) for _, plain, pol, key in rows]
    measured = "; ".join(f"{what} {'–' if r is None else f'{r:.2f}'}×"
                         for (what, *_), r in zip(rows, ratios, strict=True))
    met = all(r is not None and r >= TOLERANCE for r in ratios)
    return [(f"with {CIDRS:,} CIDRs, {GLOBS} repository globs and per-IP limits",
             "the same tree without them, same run", f"≥ {TOLERANCE:.2f}× of it", measured,
             "**met**" if met else "**missed**")]


def section(records: list[Record]) -> list[str]:
    rows = _ratios(records)
    if not any(plain for _, plain, _, _ in rows):
        return []
    lines = ["## 9. Access rules and limits", "",
             f"This tree twice, both warm and up at once: `{PLAIN}` as shipped and "
             f"`{POLICIES}` with `access:` allowing {CIDRS:,} CIDRs (999 others and "
             f"127.0.0.0/8, also as the anonymous list), the route's `repositories.allow` "
             f"of {GLOBS} globs (the bench's last) and per-IP `limits:` set far above what "
             "the bench sends (the buckets are kept and checked, never empty). Each window "
             "runs on both in alternating rounds; a row is the total over its rounds.", "",
             "| what | gateway | gateway (policies) | ratio | CPU s per GB or per 1k "
             "requests (gateway / policies) |",
             "|---|---|---|---|---|"]
    for what, plain, pol, key in rows:
        ratio = _ratio(plain, pol, key)
        cpu_key = "cpu_s_per_gb" if key == "gb_per_s" else "cpu_s_per_1k"
        cpu = (f"{plain.get(cpu_key, '–')} / {pol.get(cpu_key, '–')}"
               if plain and pol else "–")
        lines.append(f"| {what} | {plain[key] if plain else '–'} | "
                     f"{pol[key] if pol else '–'} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}×'} | {cpu} |")
    return [*lines, ""]

