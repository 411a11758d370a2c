"""BLEU-4 and CIDEr-D for captions, scored as the COCO caption evaluation (pycocoevalcap 1.2) scores them.

The scorers are florence-kit's implementation of the published definitions: BLEU (Papineni et al., 2002) and
CIDEr-D (Vedantam et al., 2015) in the form the COCO caption evaluation uses, checked against pycocoevalcap's
own outputs: BLEU-4 and CIDEr-D within 1e-9 of pycocoevalcap's, set and per image, on recorded sets of 400 images
with five references each (tests/test_ptb_tokenizer.py). As pycocoevalcap does, captions are first tokenised
with the Penn Treebank conventions, lower-cased, punctuation dropped; the references of the whole set are
tokenised as one file (image by image) and the candidates as another.

``FLORENCE_KIT_CAPTION_TOKENIZER``: ``python`` (florence-kit's own tokenizer,
:mod:`florence_kit.metrics.ptb_tokenizer`; identical tokens for 8,087 of the 8,089 captions of a test corpus
recorded from pycocoevalcap, the other two random runs of edge-case pieces), ``java`` (pycocoevalcap's tokenizer
itself, Stanford's PTBTokenizer run by Java: ``pip install pycocoevalcap`` and a Java runtime), or ``auto`` (the
default, which is ``python``).

- ``bleu4``: corpus BLEU-4: clipped n-gram matches (n = 1..4) pooled over the set, their geometric mean, times a
  brevity penalty against, per candidate, the reference length *closest* to its own (the shorter on a tie). As in
  the reference, each precision is (matches + 1e-15) / (n-grams + 1e-9) and the length ratio
  (candidate + 1e-15) / (reference + 1e-9): no other smoothing. Per-sample values are the same formula on one
  candidate.
- ``cider``: CIDEr-D: per n (1..4), each caption a vector of n-gram counts weighted by
  log(images / images whose references hold the n-gram), IDF taken over the references of the *whole set*; the
  candidate's weights clipped at the reference's, cosine similarity, a Gaussian penalty on the length difference
  (sigma 6), averaged over references and n, times 10. Being set-level, one sample's CIDEr depends on the others:
  score the set, not a single answer.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence

from florence_kit.common.errors import UserError
from florence_kit.metrics import corpus_metric

N = 4
SIGMA = 6.0
TOKENIZER_ENV = "FLORENCE_KIT_CAPTION_TOKENIZER"
LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\u000b\u000c\u2028\u2029", " "))  # one caption stays one line


def tokenize(text: str) -> str:
    """One caption's tokens as pycocoevalcap sees them: lower-cased PTB tokens, punctuation dropped, space-joined."""
    return tokenize_captions([text])[0]


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """Tokenise captions as one pycocoevalcap file, with the tokenizer ``FLORENCE_KIT_CAPTION_TOKENIZER`` names."""
    backend = os.environ.get(TOKENIZER_ENV, "auto").strip().lower() or "auto"
    if backend not in ("auto", "python", "java"):
        raise UserError(f"{TOKENIZER_ENV}={backend!r}: use 'python' (florence-kit's), 'java' (pycocoevalcap's) "
                        "or 'auto'")
    if backend == "java":
        return java_ptb_tokenize_lines(captions)
    from florence_kit.metrics.ptb_tokenizer import ptb_tokenize_lines

    return ptb_tokenize_lines([c.translate(LINE_BREAKS) for c in captions])


def java_ptb_tokenize_lines(captions: Sequence[str]) -> list[str]:
    """The same through pycocoevalcap's own ``PTBTokenizer`` (the Stanford jar run by Java), line breaks as spaces."""
    import shutil

    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise UserError("the Java caption tokenizer needs pycocoevalcap: pip install pycocoevalcap "
                        "(or unset FLORENCE_KIT_CAPTION_TOKENIZER to use florence-kit's own)") from None  # fmt: skip
    if shutil.which("java") is None:
        raise UserError("the Java caption tokenizer needs a Java runtime on PATH (e.g. apt-get install "
                        "default-jre-headless), or unset FLORENCE_KIT_CAPTION_TOKENIZER to use florence-kit's own")
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


def ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """How often each n-gram (of exactly n words) occurs."""
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


# ---------------------------------------------------------------------------------------------
# BLEU-4 (Papineni et al., 2002), closest reference length, the reference's 1e-15 / 1e-9 guards

MATCH_GUARD, COUNT_GUARD = 1e-15, 1e-9


def _bleu(matches: Sequence[float], totals: Sequence[float], candidate_len: float, reference_len: float) -> float:
    """Geometric mean of the guarded n-gram precisions, times the brevity penalty."""
    log_precision = sum(math.log((m + MATCH_GUARD) / (t + COUNT_GUARD)) for m, t in zip(matches, totals, strict=True))
    score = math.exp(log_precision / len(matches))
    ratio = (candidate_len + MATCH_GUARD) / (reference_len + COUNT_GUARD)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


@corpus_metric("bleu4")
def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
    """Corpus BLEU-4 over the set, and each sample's own BLEU-4."""
    per_sample: list[float] = []
    pooled_matches, pooled_totals = [0] * N, [0] * N
    pooled_candidate = pooled_reference = 0
    for candidate, refs in zip(*_tokenized(predictions, references), strict=True):
        words = candidate.split()
        ref_words = [ref.split() for ref in refs]
        # the reference length closest to the candidate's; the shorter one on a tie
        closest = min((len(r) for r in ref_words), key=lambda length: (abs(length - len(words)), length))
        matches, totals = [], []
        for n in range(1, N + 1):
            allowed: Counter[tuple[str, ...]] = Counter()
            for r in ref_words:
                allowed |= ngrams(r, n)  # per n-gram, its largest count in any one reference
            matches.append(sum(min(count, allowed[gram]) for gram, count in ngrams(words, n).items()))
            totals.append(max(0, len(words) - n + 1))
        per_sample.append(_bleu(matches, totals, len(words), closest))
        pooled_matches = [a + b for a, b in zip(pooled_matches, matches, strict=True)]
        pooled_totals = [a + b for a, b in zip(pooled_totals, totals, strict=True)]
        pooled_candidate += len(words)
        pooled_reference += closest
    return per_sample, _bleu(pooled_matches, pooled_totals, pooled_candidate, pooled_reference)


# ---------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al., 2015) as the COCO caption evaluation computes it


def _weighted(words: Sequence[str], idf: dict[tuple[str, ...], float], default_idf: float) -> list[dict]:
    """Per n (1..N): each n-gram's count times its IDF."""
    return [{g: c * idf.get(g, default_idf) for g, c in ngrams(words, n).items()} for n in range(1, N + 1)]


@corpus_metric("cider")
def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[float], float]:
    """CIDEr-D of each sample (IDF over the whole set's references) and their mean."""
    candidates, refs_tokens = _tokenized(predictions, references)
    ref_words = [[ref.split() for ref in refs] for refs in refs_tokens]
    # document frequency: in how many images' reference sets each n-gram occurs
    images_with: Counter[tuple[str, ...]] = Counter()
    for refs in ref_words:
        images_with.update({g for r in refs for n in range(1, N + 1) for g in ngrams(r, n)})
    log_images = math.log(float(len(ref_words)))
    idf = {g: log_images - math.log(float(df)) for g, df in images_with.items()}  # unseen n-grams: df taken as 1

    def length(words: Sequence[str]) -> int:  # the reference counts a caption's length in bigrams
        return max(0, len(words) - 1)

    scores = []
    for words, refs in zip((c.split() for c in candidates), ref_words, strict=True):
        cand = _weighted(words, idf, log_images)
        cand_norms = [math.sqrt(sum(w * w for w in v.values())) for v in cand]
        per_n = [0.0] * N
        for r in refs:
            ref = _weighted(r, idf, log_images)
            penalty = math.exp(-((length(words) - length(r)) ** 2) / (2 * SIGMA**2))
            for n in range(N):
                ref_norm = math.sqrt(sum(w * w for w in ref[n].values()))
                overlap = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in cand[n].items())
                if cand_norms[n] and ref_norm:
                    overlap /= cand_norms[n] * ref_norm
                per_n[n] += overlap * penalty
        scores.append(10.0 * sum(per_n) / N / len(refs))
    return scores, sum(scores) / len(scores)
