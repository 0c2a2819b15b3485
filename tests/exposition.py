"""A Prometheus exposition as the tests read it: through prometheus_client's own parser, never by pattern."""
from __future__ import annotations

import urllib.request
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families


class Exposition:
    def __init__(self, text: str):
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    @classmethod
    def scrape(cls, url: str) -> "Exposition":
        return cls(urllib.request.urlopen(url, timeout=10).read().decode())

    def labels(self, name: str) -> list[dict[str, str]]:
        """The label sets of every sample named `name` (a series name: `_total`, `_count`, ...)."""
        return [dict(s.labels) for s in self.samples if s.name == name]

    def value(self, name: str, **labels: str) -> Optional[float]:
        """The value of the sample `name` with exactly `labels`; None when there is none."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels)
        return found[0] if found else None
