"""Is a metric able to score here? Asked before a run trains or generates, not at its first evaluation.

Caption metrics (bleu4, cider) tokenise with the tokenizer ``FLORENCE_KIT_CAPTION_TOKENIZER`` chooses
(:mod:`florence_kit.metrics.caption`); the Java one needs pycocoevalcap and a Java runtime. Tokenising one
caption with the chosen tokenizer is the check: it fails with the same one-line error scoring would, minutes
or hours earlier.
"""

from __future__ import annotations

from collections.abc import Iterable

CAPTION_METRICS = frozenset({"bleu4", "cider"})


def check_metrics_ready(names: Iterable[str]) -> None:
    """Raise the scoring's own UserError now when one of ``names`` could not score (its tokenizer missing)."""
    if CAPTION_METRICS.intersection(names):
        from florence_kit.metrics.caption import tokenize_captions

        tokenize_captions(["A caption."])
