"""Metric values checked by hand (worked in the comments) and against the reference implementations."""

from __future__ import annotations

import importlib.util

import pytest

from florence_kit.metrics import corpus_metric, get_metric, metric
from florence_kit.metrics.caption import tokenize
from florence_kit.metrics.vqa import normalize_vqa_answer

CAPTION_PREDS = ["a man is riding a horse on the beach", "two dogs are playing in the snow",
                 "a red car parked on a street"]
CAPTION_REFS = [["a man is riding a brown horse on the beach", "a person rides a horse along the beach"],
                ["two dogs are playing together in the snow", "a pair of dogs play in snow"],
                ["a red car parked on the street", "a small red car is parked by the road"]]


def test_bleu4_sentence_value_worked_by_hand() -> None:
    # "two dogs are playing in the snow" (7 words) against the two references of sample 2:
    # 1-grams 7/7, 2-grams 5/6 (not "playing in"), 3-grams 3/5, 4-grams 1/4 ("two dogs are playing");
    # closest reference length 7 ("a pair of dogs play in snow") -> no brevity penalty.
    # BLEU-4 = (1 * 5/6 * 3/5 * 1/4) ** (1/4) = 0.125 ** 0.25 = 0.594604
    _, score = get_metric("bleu4").compute([CAPTION_PREDS[1]], [CAPTION_REFS[1]])
    assert score == pytest.approx(0.125**0.25, abs=1e-6)


def test_bleu4_and_cider_match_pycocoevalcap() -> None:
    # Reference numbers printed by pycocoevalcap 1.2 (Bleu(4), Cider()) for exactly these inputs.
    per, corpus = get_metric("bleu4").compute(CAPTION_PREDS, CAPTION_REFS)
    assert corpus == pytest.approx(0.6890808602615298, rel=1e-9)
    assert per == pytest.approx([0.7730551755884941, 0.5946035573035137, 0.6434588839466586], rel=1e-9)
    per, corpus = get_metric("cider").compute(CAPTION_PREDS, CAPTION_REFS)
    assert corpus == pytest.approx(4.149270215178641, rel=1e-9)
    assert per == pytest.approx([4.379054812010092, 3.66827022509573, 4.400485608430101], rel=1e-9)


def test_cider_is_ten_for_exact_answers_and_zero_for_unrelated() -> None:
    # Every n-gram of each caption occurs in one image's references only, so all IDF weights are log(2):
    # hypothesis and reference vectors are equal, cosine 1 for n = 1..4, no length penalty -> 10.
    refs = [["a cat on a mat"], ["two birds in the sky"]]
    _, score = get_metric("cider").compute(["a cat on a mat", "two birds in the sky"], refs)
    assert score == pytest.approx(10.0)
    _, score = get_metric("cider").compute(["zebra", "ocean waves"], refs)
    assert score == 0.0


def test_caption_tokenizer_is_pycocoevalcaps() -> None:
    # PTB tokens, lower-cased, punctuation dropped (tests/test_ptb_tokenizer.py checks thousands against the jar)
    assert tokenize("A man's dog, running.") == "a man 's dog running"


def test_cer_and_wer_known_values() -> None:
    cer, wer = get_metric("cer"), get_metric("wer")
    assert cer.compute(["sitting"], [["kitten"]])[1] == pytest.approx(3 / 6)  # k->s, e->i, +g over 6 chars
    # set-level: (1 edit + 0 edits) / (4 + 11 reference characters)
    per, total = cer.compute(["abxd", "hello world"], [["abcd"], ["hello world"]])
    assert per == [0.25, 0.0] and total == pytest.approx(1 / 15)
    # "sat"->"sit" is one substitution, the second "the" is deleted: 2 edits over 6 reference words
    assert wer.compute(["the cat sit on mat"], [["the cat sat on the mat"]])[1] == pytest.approx(2 / 6)
    assert wer.compute(["Hello World"], [["hello world"]])[1] == 1.0  # case counts in OCR
    assert not cer.higher_is_better and not wer.higher_is_better
    assert cer.compute(["abc"], [["abc\n"]])[1] == 0.0 and cer.compute(["abc"], [[" abcd "]])[1] == 1 / 4  # as jiwer


def test_vqa_accuracy_official_formula() -> None:
    humans = ["yes"] * 3 + ["no"] * 7
    acc = get_metric("vqa_accuracy").score
    # 3 humans said "yes": leaving out one of them leaves 2 (2/3), leaving out any other leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert acc("yes", humans) == pytest.approx(0.9)
    assert acc("Yes.", humans) == pytest.approx(0.9)  # normalised like vqaEval.py
    assert acc("no", humans) == 1.0
    assert acc("maybe", humans) == 0.0
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert acc("two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)


def test_vqa_normalisation_rules() -> None:
    assert normalize_vqa_answer("The Dog") == "dog"
    assert normalize_vqa_answer("two") == "2"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("1,000") == "1000"


def test_relaxed_accuracy_chartqa_rule() -> None:
    ra = get_metric("relaxed_accuracy").score
    assert ra("12.3", ["12"]) == 1.0  # 2.5 % off
    assert ra("13", ["12"]) == 0.0  # 8.3 % off
    assert ra("45%", ["0.44"]) == 1.0  # 0.45 vs 0.44: 2.3 %
    assert ra("Yes", ["yes"]) == 1.0 and ra("no", ["yes"]) == 0.0


def test_plugins_register_metrics_and_names_stay_unique() -> None:
    @metric("test_always_one")
    def always_one(prediction, references):
        return 1.0

    assert get_metric("test_always_one").compute(["a", "b"], [["x"], ["y"]]) == ([1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="already registered"):
        corpus_metric("test_always_one")(lambda p, r: ([], 0.0))
    with pytest.raises(KeyError, match="known metrics"):
        get_metric("nope")


def test_caption_metrics_need_no_java_and_the_java_tokenizer_says_what_to_install(monkeypatch) -> None:
    """The default tokenizer is florence-kit's own (no Java, no pycocoevalcap); asking for the Java one without a
    Java runtime stops with one line naming what to install, not a traceback."""
    import shutil
    import sys

    from florence_kit.common.errors import UserError
    from florence_kit.metrics.caption import TOKENIZER_ENV, tokenize_captions

    monkeypatch.setitem(sys.modules, "pycocoevalcap.tokenizer.ptbtokenizer", None)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    for setting in (None, "auto", "python"):
        if setting is None:
            monkeypatch.delenv(TOKENIZER_ENV, raising=False)
        else:
            monkeypatch.setenv(TOKENIZER_ENV, setting)
        assert tokenize_captions(["A dog (brown) isn't here."]) == ["a dog -lrb- brown -rrb- is n't here"]
    monkeypatch.setenv(TOKENIZER_ENV, "java")
    with pytest.raises(UserError, match="pip install pycocoevalcap"):
        tokenize_captions(["a dog"])
    monkeypatch.delitem(sys.modules, "pycocoevalcap.tokenizer.ptbtokenizer")
    if importlib.util.find_spec("pycocoevalcap") is not None:
        with pytest.raises(UserError, match="Java runtime"):
            tokenize_captions(["a dog"])
