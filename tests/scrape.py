"""Scraping the archive's /metrics with prometheus_client's own parser."""

from __future__ import annotations

from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: list[tuple[str, dict[str, str], float]]  # (sample name, labels, value)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(v for n, found, v in self.samples
                   if n == name and all(found.get(k) == w for k, w in labels.items()))

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def label_values(self) -> set[str]:
        """Every label's values, but histogram bucket bounds (`le`)."""
        return {value for _, labels, _ in self.samples for key, value in labels.items()
                if key != "le"}


def scrape(url: str) -> Scrape:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = [(s.name, dict(s.labels), s.value)
               for family in text_string_to_metric_families(response.text)
               for s in family.samples]
    return Scrape(response.text, samples)
