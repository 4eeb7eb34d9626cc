"""Benchmark results: figures per variant, ratios to a baseline, and the target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bench.stats import paired_ratio, percentile


@dataclass
class Metric:
    """One figure of a benchmark: the median of each variant and the paired ratios to the baseline."""

    name: str
    unit: str
    values: dict[str, float]
    ratios: dict[str, float] = field(default_factory=dict)
    higher_is_better: bool = False


@dataclass
class Target:
    """A goal that one ratio must reach: `ratio <= limit` (or `>=` when `at_least`)."""

    text: str
    metric: str
    variant: str
    limit: float
    at_least: bool
    value: float | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit


@dataclass
class BenchResult:
    """The outcome of one benchmark run, with the per-round samples behind its medians."""

    name: str
    title: str
    measured: str
    variants: dict[str, str]
    baseline: str | None
    parameters: dict[str, Any]
    metrics: list[Metric]
    target: Target | None = None
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def metric(self, name: str) -> Metric:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        known = ", ".join(m.name for m in self.metrics)
        raise KeyError(f"benchmark {self.name} has no metric {name!r}; known: {known}")

    def evaluate_target(self) -> None:
        """Fill in the target's value from the metric and variant it names."""
        if self.target is None:
            return
        ratios = self.metric(self.target.metric).ratios
        self.target.value = ratios.get(self.target.variant)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.target is not None:
            data["target"]["met"] = self.target.met
        return data


def summarize(
    samples: list[dict[str, Any]],
    key: str,
    *,
    name: str,
    unit: str,
    variants: list[str],
    baseline: str | None,
    higher_is_better: bool = False,
    quantile: float = 0.5,
) -> Metric:
    """Build a metric from per-round samples (dicts with "variant" and `key`).

    Each variant's value is the `quantile` of its samples (the median by
    default). With the median, the ratio to the baseline is the median of the
    per-round ratios; with another quantile it is the ratio of the quantiles.
    A variant without samples of `key` is left out.
    """
    series = {v: [float(s[key]) for s in samples if s["variant"] == v and key in s] for v in variants}
    values = {v: percentile(points, quantile) for v, points in series.items() if points}
    ratios: dict[str, float] = {}
    if baseline is not None and series.get(baseline):
        for variant, points in series.items():
            if variant == baseline or not points:
                continue
            if quantile == 0.5 and len(points) == len(series[baseline]):
                ratios[variant] = paired_ratio(points, series[baseline])
            elif values[baseline]:
                ratios[variant] = values[variant] / values[baseline]
    return Metric(name=name, unit=unit, values=values, ratios=ratios, higher_is_better=higher_is_better)
