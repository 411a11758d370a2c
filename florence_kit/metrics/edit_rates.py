"""CER and WER for OCR: edit distance (Levenshtein, via the rapidfuzz-backed ``Levenshtein`` package).

Set-level, as ``jiwer.cer`` / ``jiwer.wer`` compute them (checked case by case against jiwer 4.0 in
tests/test_metric_references.py): the edits of every sample are summed and divided by the summed reference
length (characters for CER, words for WER), so long pages weigh more than short lines. Lower is better. Text is
compared as written (no case folding): OCR is judged on exact transcription; outer whitespace is stripped. With
several references, the one with the fewest edits is used. One difference: WER splits words on any whitespace
(``str.split``, as torchmetrics); jiwer splits on spaces, so a lone tab or newline joins two words there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import Levenshtein

from florence_kit.metrics import corpus_metric


def _rate(split: Callable[[str], Sequence[str]]):
    def compute(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
        per_sample, edits, length = [], 0, 0
        for prediction, refs in zip(predictions, references, strict=True):
            if not refs:
                raise ValueError("CER/WER need a reference text per sample")
            hyp = split(prediction)
            best = min((Levenshtein.distance(hyp, split(ref)), len(split(ref))) for ref in refs)
            per_sample.append(best[0] / max(best[1], 1))
            edits, length = edits + best[0], length + best[1]
        return per_sample, edits / max(length, 1)

    return compute


# leading/trailing whitespace is not text (a reference read from a file often ends in a newline): stripped as jiwer does
cer = corpus_metric("cer", higher_is_better=False)(_rate(lambda text: text.strip()))
wer = corpus_metric("wer", higher_is_better=False)(_rate(lambda text: text.split()))
