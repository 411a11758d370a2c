"""ANLS (Biten et al., ICCV 2019), with the edges the official DocVQA evaluation gives it.

tests/test_metric_references.py checks it against that evaluation's recorded scores on 400 questions
(docs/metrics.md).

Edges where implementations differ, chosen to agree with the DocVQA evaluation:
- both strings are stripped, lower-cased and whitespace-collapsed before the edit distance, but the
  normaliser is the length of the longer *raw* string (upper-cased, which can change a length);
- the per-question score ``1 - min NL`` is set to 0 only when *below* the threshold, so 0.5 is kept;
- two empty strings score 1 (distance 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import Levenshtein

from florence_kit.metrics import metric

THRESHOLD = 0.5


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalised_levenshtein(prediction: str, reference: str) -> float:
    """Edit distance of the normalised strings over the length of the longer raw string."""
    length = max(len(reference.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return Levenshtein.distance(_normalise(reference), _normalise(prediction)) / length


@metric("anls")
def anls(prediction: str, references: Sequence[str], threshold: float = THRESHOLD) -> float:
    """Per-question ANLS: 1 - the smallest NL over the references, zeroed below the threshold."""
    if not references:
        raise ValueError("ANLS needs at least one reference answer")
    score = 1.0 - min(normalised_levenshtein(prediction, ref) for ref in references)
    return 0.0 if score < threshold else score
