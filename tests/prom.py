"""/metrics read with prometheus_client's own parser of the exposition format, not with regexes."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape of /metrics: `scrape("name", label="value")` is that sample's value."""

    def __init__(self, text: str) -> None:
        self.samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
                        for s in family.samples]

    @property
    def names(self) -> set[str]:
        """Every sample name (histograms give NAME_bucket, NAME_sum, NAME_count)."""
        return {name for name, _, _ in self.samples}

    def __call__(self, name: str, **labels: str) -> float:
        for sample_name, sample_labels, value in self.samples:
            if sample_name == name and sample_labels == labels:
                return value
        raise AssertionError(f"{name}{labels or ''} not in /metrics")


def scrape(base: str) -> Scrape:
    """GET BASE/metrics and parse it."""
    return Scrape(httpx.get(f"{base}/metrics", timeout=10).text)
