"""The samples of one /metrics rendering, looked up by name and labels: the status page
reads the very text /metrics serves, so its numbers are /metrics' numbers.

Pure: parses text, does no I/O and keeps nothing between renderings.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class Samples:
    def __init__(self, text: str) -> None:
        self._by_name: defaultdict[str, list[Sample]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._by_name[sample.name].append(sample)

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self._by_name.get(name, ())
                if all(s.labels.get(k) == v for k, v in labels.items())]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`."""
        return sum(s.value for s in self.matching(name, **labels))

    def by(self, label: str, name: str, **labels: str) -> dict[str, float]:
        """Sums of `name` per value of `label` (other labels summed over)."""
        found: dict[str, float] = {}
        for sample in self.matching(name, **labels):
            key = sample.labels.get(label, "")
            found[key] = found.get(key, 0.0) + sample.value
        return found

    def histogram(self, name: str, **labels: str) -> tuple[float, float, list[tuple[float, float]]]:
        """(count, sum, cumulative buckets by upper bound), summed over other labels."""
        buckets: dict[float, float] = {}
        for sample in self.matching(f"{name}_bucket", **labels):
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return (self.total(f"{name}_count", **labels), self.total(f"{name}_sum", **labels),
                sorted(buckets.items()))


def quantile_bound(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (None without observations;
    inf when it lies beyond the last finite bucket)."""
    if count <= 0:
        return None
    want = q * count
    for bound, cumulative in buckets:
        if cumulative >= want:
            return bound
    return None
