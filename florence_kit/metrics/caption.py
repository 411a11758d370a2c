"""BLEU-4 and CIDEr-D for captions, exactly as the COCO caption evaluation (pycocoevalcap 1.2) computes them.

pycocoevalcap is the reference every captioning paper reports. Its scorers are pure Python and are ported here
line for line; its tokenizer is Stanford's PTBTokenizer (Java), reproduced in Python by the separate package
``florence-kit-ptb`` (GPL-2.0-or-later, its grammar being transcribed from Stanford's; packages/florence-kit-ptb
in the repository) so no Java is needed: the same tokens for every caption of an 8,089-caption test corpus, and
BLEU-4 / CIDEr-D within 1e-9 of pycocoevalcap's on the same files (tests/test_ptb_tokenizer.py). As pycocoevalcap
does, the references of the whole set are tokenised as one file (image by image) and the candidates as another.

``FLORENCE_KIT_CAPTION_TOKENIZER``: ``python`` (florence-kit-ptb), ``java`` (pycocoevalcap's own tokenizer:
``pip install pycocoevalcap`` and a Java runtime), or ``auto`` (the default: python where installed, else java
where it can run). Without either, bleu4 / cider stop with one line saying what to install.

- ``bleu4``: corpus BLEU-4, clipped n-gram counts pooled over the set, brevity penalty against the
  *closest* reference length (pycocoevalcap's ``option='closest'``), no smoothing (its 1e-15 / 1e-9
  guards only avoid division by zero). Per-sample values are the sentence-level BLEU-4 of the same code.
- ``cider``: CIDEr-D (pycocoevalcap's ``Cider``): TF-IDF n-gram vectors (n = 1..4) whose IDF comes from
  the references of the *whole set*, clipped cosine with a Gaussian length penalty (sigma 6), times 10.
  Being set-level, one sample's CIDEr depends on the others: score the set, not a single answer.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Sequence

from florence_kit.common.errors import UserError
from florence_kit.metrics import corpus_metric

N = 4
SIGMA = 6.0
TOKENIZER_ENV = "FLORENCE_KIT_CAPTION_TOKENIZER"
PTB_HINT = ("pip install ./packages/florence-kit-ptb (from the florence-kit checkout; GPL-2.0-or-later), "
            "or pycocoevalcap and a Java runtime with FLORENCE_KIT_CAPTION_TOKENIZER=java")
LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\u000b\u000c\u2028\u2029", " "))  # one caption stays one line


def _python_tokenizer():  # noqa: ANN202 - florence_kit_ptb's ptb_tokenize_lines, or None
    try:
        from florence_kit_ptb import ptb_tokenize_lines
    except ImportError:
        return None
    return ptb_tokenize_lines


def tokenize(text: str) -> str:
    """One caption's tokens as pycocoevalcap sees them: lower-cased PTB tokens, punctuation dropped, space-joined."""
    return tokenize_captions([text])[0]


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """Tokenise captions as one pycocoevalcap file, with the tokenizer ``FLORENCE_KIT_CAPTION_TOKENIZER`` names."""
    import shutil

    backend = os.environ.get(TOKENIZER_ENV, "auto").strip().lower() or "auto"
    if backend not in ("auto", "python", "java"):
        raise UserError(f"{TOKENIZER_ENV}={backend!r}: use 'python' (florence-kit-ptb), 'java' (pycocoevalcap's) "
                        "or 'auto'")
    python = _python_tokenizer() if backend in ("auto", "python") else None
    if python is not None:
        return python(captions)
    if backend == "python":
        raise UserError(f"{TOKENIZER_ENV}=python needs the florence-kit-ptb package: {PTB_HINT}")
    if backend == "auto" and shutil.which("java") is None:
        raise UserError(f"bleu4 and cider tokenise captions exactly as pycocoevalcap does, which needs: {PTB_HINT}")
    return java_ptb_tokenize_lines(captions)


def java_ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """The same through pycocoevalcap's own ``PTBTokenizer`` (the Stanford jar run by Java), line breaks as spaces."""
    import shutil

    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise UserError("the Java caption tokenizer needs pycocoevalcap: pip install pycocoevalcap "
                        "(or unset FLORENCE_KIT_CAPTION_TOKENIZER to use florence-kit-ptb)") from None  # fmt: skip
    if shutil.which("java") is None:
        raise UserError("the Java caption tokenizer needs a Java runtime on PATH (e.g. apt-get install default-jre), "
                        "or unset FLORENCE_KIT_CAPTION_TOKENIZER to use florence-kit-ptb")  # fmt: skip
    if not captions:
        return []
    out = PTBTokenizer().tokenize({i: [{"caption": c.translate(LINE_BREAKS)}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


def _tokenized(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Candidates and references tokenised as pycocoevalcap's COCOEvalCap does: two files, references image by image."""
    if any(not refs for refs in references):
        raise ValueError("BLEU-4 and CIDEr need at least one reference caption per sample")
    flat = tokenize_captions([ref for refs in references for ref in refs])
    grouped, start = [], 0
    for refs in references:
        grouped.append(flat[start : start + len(refs)])
        start += len(refs)
    return tokenize_captions(predictions), grouped


def ngram_counts(sentence: str, n: int = N) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# BLEU-4 (pycocoevalcap.bleu.bleu_scorer, option="closest")

_SMALL, _TINY = 1e-9, 1e-15


def _bleu_from(correct: Sequence[int], guess: Sequence[int], testlen: float, reflen: float) -> float:
    bleu = 1.0
    for k in range(N):
        bleu *= (correct[k] + _TINY) / (guess[k] + _SMALL)
    bleu **= 1.0 / N
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


@corpus_metric("bleu4")
def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
    """Corpus BLEU-4 over the set, and each sample's sentence BLEU-4."""
    per_sample: list[float] = []
    total_correct, total_guess, total_test, total_ref = [0] * N, [0] * N, 0, 0
    for test, refs in zip(*_tokenized(predictions, references), strict=True):
        testlen = len(test.split())
        reflens, maxcounts = [], {}
        for tok in refs:
            reflens.append(len(tok.split()))
            for gram, count in ngram_counts(tok).items():
                maxcounts[gram] = max(maxcounts.get(gram, 0), count)
        reflen = min((abs(length - testlen), length) for length in reflens)[1]
        correct = [0] * N
        for gram, count in ngram_counts(test).items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), count)
        guess = [max(0, testlen - k + 1) for k in range(1, N + 1)]
        per_sample.append(_bleu_from(correct, guess, testlen, reflen))
        total_test += testlen
        total_ref += reflen
        for k in range(N):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
    return per_sample, _bleu_from(total_correct, total_guess, total_test, total_ref)


# ---------------------------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap.cider.cider_scorer)


@corpus_metric("cider")
def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
    """CIDEr-D of each sample (IDF over the whole set's references) and their mean."""
    hyps, refs_tokens = _tokenized(predictions, references)
    tests = [ngram_counts(p) for p in hyps]
    crefs = [[ngram_counts(r) for r in refs] for refs in refs_tokens]
    document_frequency: dict[tuple[str, ...], float] = defaultdict(float)
    for refs in crefs:
        for gram in {g for ref in refs for g in ref}:
            document_frequency[gram] += 1
    ref_len = math.log(float(len(crefs)))

    def vector(counts: dict[tuple[str, ...], int]) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = float(tf) * (ref_len - math.log(max(1.0, document_frequency[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:  # sic: pycocoevalcap measures length in bigrams; kept for identical scores
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def similarity(hyp: tuple, ref: tuple) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.e ** (-(float(len_h - len_r) ** 2) / (2 * SIGMA**2))
        val = [0.0] * N
        for n in range(N):
            for gram in vec_h[n]:
                val[n] += min(vec_h[n][gram], vec_r[n][gram]) * vec_r[n][gram]
            if norm_h[n] != 0 and norm_r[n] != 0:
                val[n] /= norm_h[n] * norm_r[n]
            val[n] *= penalty
        return val

    scores = []
    for test, refs in zip(tests, crefs, strict=True):
        hyp = vector(test)
        total = [0.0] * N
        for ref in refs:
            total = [a + b for a, b in zip(total, similarity(hyp, vector(ref)), strict=True)]
        scores.append(sum(total) / N / len(refs) * 10.0)
    return scores, sum(scores) / len(scores)
