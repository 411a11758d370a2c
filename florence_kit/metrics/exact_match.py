"""Exact match after the same light normalisation ANLS uses (case, outer and repeated spaces)."""

from __future__ import annotations

from collections.abc import Sequence

from florence_kit.metrics import metric


@metric("exact_match")
def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction equals any reference after normalisation, else 0.0."""
    norm = " ".join(prediction.strip().lower().split())
    return float(any(norm == " ".join(ref.strip().lower().split()) for ref in references))
