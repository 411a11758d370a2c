"""Metrics registered by name, in two stages: a per-sample score, then an aggregation.

Per-sample scores are what ``predictions.jsonl`` stores (so a run can be inspected and re-scored);
the aggregation turns them into the task score (a mean for ANLS; corpus metrics can override it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

SampleFn = Callable[[str, Sequence[str]], float]
AggregateFn = Callable[[Sequence[float]], float]


@dataclass(frozen=True)
class Metric:
    """A named metric: ``score(prediction, references)`` per sample, ``aggregate(scores)`` per set."""

    name: str
    score: SampleFn
    aggregate: AggregateFn = fmean


_METRICS: dict[str, Metric] = {}


def metric(name: str, aggregate: AggregateFn = fmean) -> Callable[[SampleFn], SampleFn]:
    """Register a per-sample scoring function under ``name`` (plugins use the same decorator)."""

    def register(fn: SampleFn) -> SampleFn:
        if name in _METRICS and _METRICS[name].score is not fn:
            raise ValueError(f"metric '{name}' is already registered by {_METRICS[name].score.__module__}")
        _METRICS[name] = Metric(name, fn, aggregate)
        return fn

    return register


def get_metric(name: str) -> Metric:
    """Look a metric up by name; the KeyError message lists what exists."""
    if name not in _METRICS:
        raise KeyError(f"unknown metric '{name}'; known metrics: {', '.join(sorted(_METRICS))}")
    return _METRICS[name]


def available_metrics() -> list[str]:
    return sorted(_METRICS)


# Built-in metrics register themselves on import.
from florence_kit.metrics import anls as _anls  # noqa: E402,F401
from florence_kit.metrics import exact_match as _exact_match  # noqa: E402,F401
