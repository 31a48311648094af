"""Metrics of a run: each a name, a value, a unit and an improvement direction, written as JSON lines.

Owns the result record format (one JSON object per line on stdout):
    {"scenario": "fleet-fanout", "seed": 1, "metric": "fetch_time_p99", "value": 12.3, "unit": "s",
     "better": "lower", ...labels}
and percentiles. It must not print anything but results (logs go to stderr through `logging`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, TextIO

__all__ = ["Metric", "Results", "percentile"]


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; NaN when empty."""
    v = sorted(values)
    if not v:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(v)))
    return v[min(rank, len(v)) - 1]


@dataclass(frozen=True)
class Metric:
    name: str
    value: float | int | str | None
    unit: str
    better: str  # "lower" | "higher" | "none" (informational)
    labels: tuple[tuple[str, Any], ...] = ()

    def record(self, scenario: str, seed: int) -> dict:
        value = self.value
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 9)
        out = {"scenario": scenario, "seed": seed, "metric": self.name, "value": value,
               "unit": self.unit, "better": self.better}
        out.update(dict(self.labels))
        return out


@dataclass
class Results:
    scenario: str
    seed: int
    metrics: list[Metric] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # data for the figure, not printed

    def add(self, name: str, value: Any, unit: str, better: str, **labels: Any) -> None:
        if better not in ("lower", "higher", "none"):
            raise ValueError(f"better must be lower/higher/none, not {better!r}")
        self.metrics.append(Metric(name, value, unit, better, tuple(sorted(labels.items()))))

    def value(self, name: str) -> Any:
        for m in self.metrics:
            if m.name == name:
                return m.value
        raise KeyError(name)

    def records(self) -> list[dict]:
        return [m.record(self.scenario, self.seed) for m in self.metrics]

    def write(self, out: TextIO) -> None:
        for r in self.records():
            out.write(json.dumps(r, sort_keys=False) + "\n")
        out.flush()
