"""Metrics registered by name, in two stages: a per-sample score, then an aggregation.

Per-sample scores are what ``predictions.jsonl`` stores (so a run can be inspected and re-scored);
the aggregation turns them into the task score (a mean for ANLS). Corpus metrics (CIDEr's IDF is
computed over every reference of the set, BLEU-4 and CER pool their counts) register with
:func:`corpus_metric` instead: one function sees the whole set and returns both stages at once.
Plugins register their own metrics with the same decorators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

SampleFn = Callable[[str, Sequence[str]], float]
AggregateFn = Callable[[Sequence[float]], float]
CorpusFn = Callable[[Sequence[str], Sequence[Sequence[str]]], tuple[list[float], float]]


@dataclass(frozen=True)
class Metric:
    """A named metric: ``score(prediction, references)`` per sample, ``aggregate(scores)`` per set.

    ``corpus``, when set, replaces both stages for a whole set: ``corpus(predictions, references)``
    returns ``(per-sample scores, set score)``. ``higher_is_better`` is False for error rates.
    """

    name: str
    score: SampleFn
    aggregate: AggregateFn = fmean
    corpus: CorpusFn | None = None
    higher_is_better: bool = True

    def compute(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
        """(per-sample scores, set score) for a whole evaluation set."""
        return self.compute_with_details(predictions, references)[:2]  # type: ignore[return-value]

    def compute_with_details(
        self, predictions: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[list[float], float, dict]:
        """:meth:`compute` plus the details a corpus metric may add as a third value (mAP's per-class AP)."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
        if not predictions:
            raise ValueError(f"metric '{self.name}' needs at least one prediction")
        if self.corpus is not None:
            out = self.corpus(predictions, references)
            return out[0], out[1], (out[2] if len(out) > 2 else {})  # type: ignore[misc]
        scores = [float(self.score(p, r)) for p, r in zip(predictions, references, strict=True)]
        return scores, float(self.aggregate(scores)), {}


_METRICS: dict[str, Metric] = {}


def _register(entry: Metric, fn: Callable[..., object]) -> None:
    existing = _METRICS.get(entry.name)
    if existing is not None and (existing.corpus or existing.score) is not fn:
        owner = getattr(existing.corpus or existing.score, "__module__", "?")
        raise ValueError(f"metric '{entry.name}' is already registered by {owner}")
    _METRICS[entry.name] = entry


def metric(
    name: str, aggregate: AggregateFn = fmean, *, higher_is_better: bool = True
) -> Callable[[SampleFn], SampleFn]:
    """Register a per-sample scoring function under ``name`` (plugins use the same decorator)."""

    def register(fn: SampleFn) -> SampleFn:
        _register(Metric(name, fn, aggregate, higher_is_better=higher_is_better), fn)
        return fn

    return register


def corpus_metric(name: str, *, higher_is_better: bool = True) -> Callable[[CorpusFn], CorpusFn]:
    """Register a set-level metric: ``fn(predictions, references) -> (per-sample scores, set score)``."""

    def register(fn: CorpusFn) -> CorpusFn:
        def one(prediction: str, references: Sequence[str]) -> float:
            return fn([prediction], [references])[1]

        _register(Metric(name, one, corpus=fn, higher_is_better=higher_is_better), fn)
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
from florence_kit.metrics import caption as _caption  # noqa: E402,F401
from florence_kit.metrics import edit_rates as _edit_rates  # noqa: E402,F401
from florence_kit.metrics import exact_match as _exact_match  # noqa: E402,F401
from florence_kit.metrics import florence_task as _florence_task  # noqa: E402,F401
from florence_kit.metrics import region_scores as _region_scores  # noqa: E402,F401
from florence_kit.metrics import segmentation as _segmentation  # noqa: E402,F401
from florence_kit.metrics import vqa as _vqa  # noqa: E402,F401
