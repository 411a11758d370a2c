"""VQA accuracy (the VQAv2 definition and answer normalisation) and ChartQA's relaxed accuracy.

``vqa_accuracy`` implements the accuracy defined by Antol et al., "VQA: Visual Question Answering" (ICCV 2015),
as the official VQA evaluation computes it (https://github.com/GT-Vision-Lab/VQA, ``vqaEval.py``): with the ten
human answers of a question, an answer scores min(#humans who gave it / 3, 1), averaged over the ten
leave-one-annotator-out subsets, so 3 matching humans of 10 give 0.9, not 1.0; 4 or more give 1.0. The
normalisation tables below (contractions, punctuation marks, number words, articles) are that evaluation's
published tables, reproduced as facts so that scores match it (NOTICE names the source; the repository states no
licence). The normalisation follows the reference's observable behaviour, quirks included: a period is kept
only before a digit (so "3." loses its period), a comma between digits makes every listed punctuation mark
vanish rather than become a space, and only the first 32 periods are removed. tests/test_metric_references.py
checks the normaliser against the reference's recorded output for every answer of a 600-question corpus.
One deliberate difference: the reference normalises the human answers only when the ten disagree (when all ten
wrote the same string, the answer must equal it as typed, after strip); here both sides are always normalised,
so "Yes" matches ten "yes". On every question where the humans disagree the scores are identical.

``relaxed_accuracy`` (ChartQA; Methani et al. 2020, Masry et al. 2022): a numeric answer is right within 5 % of
a numeric reference (``"12%"`` reads as 0.12; Python's ``float`` decides what is a number, so "1,000" is not one
and "1e3" is); otherwise it must equal the reference ignoring case; the best over the references. The scores
equal those of Pix2Struct's ``relaxed_correctness`` (what Pix2Struct's ChartQA numbers were computed with), except
that outer whitespace is stripped first (there "12% " reads as text).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from florence_kit.metrics import metric

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
_DIGIT_COMMA = re.compile(r"\d,\d")


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation, then number words, articles and contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    digit_comma = _DIGIT_COMMA.search(text) is not None  # "1,000": every listed mark is deleted, none spaced
    out = text
    for mark in PUNCTUATION:
        touching_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if digit_comma or touching_space else " ")
    out = _PERIOD.sub("", out, count=32)  # the reference removes at most 32 periods
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


@metric("vqa_accuracy")
def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of min(#matching humans / 3, 1)."""
    if not references:
        raise ValueError("VQA accuracy needs the human answers of the question")
    answer = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(ref) for ref in references]
    matches = [h == answer for h in humans]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(humans)


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


@metric("relaxed_accuracy")
def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = 0.05) -> float:
    """1.0 when a number is within 5 % of a reference number, or a string matches ignoring case."""
    pred = _to_float(prediction)
    for ref in references:
        target = _to_float(ref)
        if pred is not None and target:
            if abs(pred - target) / abs(target) <= tolerance:
                return 1.0
        elif prediction.strip().lower() == ref.strip().lower():
            return 1.0
    return 0.0
