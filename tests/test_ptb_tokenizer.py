"""Caption tokens and scores equal pycocoevalcap's: florence-kit's PTB tokenizer, checked token for token.

The fixtures in tests/fixtures/captions/ were recorded by running pycocoevalcap 1.2 (the Stanford jar, via Java)
over the corpus make_corpus.py writes (record_reference.py does both); these tests need neither, except the last,
which runs the jar itself where Java and pycocoevalcap are installed (as in CI).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from florence_kit.common.errors import UserError
from florence_kit.metrics import get_metric
from florence_kit.metrics.caption import TOKENIZER_ENV, java_ptb_tokenize_lines, tokenize, tokenize_captions
from florence_kit.metrics.ptb_tokenizer import ptb_tokenize_lines

# Recorded captions whose tokens still differ from the jar's: random runs of edge-case pieces, none of them a
# caption anyone writes (docs/metrics.md). Every other caption must come out identical.
KNOWN_DIFFERENCES = {
    "http:// A x a.m.1,000e-mail!",  # the jar: a.m.1,000e-mail; florence-kit: a.m. 1,000e-mail
    "`😀B.. ^ ..fig..com-7're €",  # the jar: fig..com-7; florence-kit: fig com-7
}

FIXTURES = Path(__file__).parent / "fixtures" / "captions"


def _load_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", FIXTURES / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recorded() -> list[dict]:
    with gzip.open(FIXTURES / "ptb_tokens.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def scores() -> dict:
    return json.loads((FIXTURES / "scores.json").read_text(encoding="utf-8"))


def test_fixture_is_the_committed_corpus(recorded) -> None:
    """The recorded captions are what make_corpus.py generates (so re-recording reproduces them)."""
    assert [r["caption"] for r in recorded] == _load_corpus_module().corpus()
    assert len(recorded) >= 5000


def test_tokens_equal_the_jar_for_every_caption(recorded) -> None:
    ours = ptb_tokenize_lines([r["caption"] for r in recorded])
    wrong = [(r["caption"], r["tokens"], o) for r, o in zip(recorded, ours, strict=True) if r["tokens"] != o]
    unexpected = [w for w in wrong if w[0] not in KNOWN_DIFFERENCES]
    assert not unexpected, f"{len(unexpected)} captions differ, e.g. (caption, jar, ours): {unexpected[:3]}"
    assert len(recorded) - len(wrong) >= 8087


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [  # pieces the jar keeps whole, splits, or turns into bracket tokens
        ("A black-and-white photo of a 2.5-metre wall at 3:30.", "a black-and-white photo of a 2.5-metre wall at 3:30"),
        ("It cost $1,234.50 in the U.S. by e-mail!", "it cost $ 1,234.50 in the u.s. by e-mail"),
        ("The man's dog can't swim; don't (really).", "the man 's dog ca n't swim do n't -lrb- really -rrb-"),
        ('She said "hi" [twice] {x}...', "she said hi -lsb- twice -rsb- -lcb- x -rcb-"),
        ("Café 😀 ☀ ✈ — naïve", "café ☀ ✈ naïve"),  # BMP symbols are tokens, an emoji (two UTF-16 halves) is deleted
        ("I cannot gonna 'twas", "i can not gon na 't was"),
        ("5 1/2 inches, ½ cup", "5\u00a01/2 inches 1/2 cup"),  # a fraction keeps its space, as a no-break space
        ("Mr. Smith at St. James's Park, No. 5 vs. no. x", "mr. smith at st. james 's park no. 5 vs. no x"),
        ("O'Brien's ma'am y'all rock'n'roll Dunkin'", "o'brien 's ma'am y' all rock 'n' roll dunkin'"),
        ("Call (555) 123-4567 or +44 20 7946 0958 :)",
         "call -lrb-555-rrb-\u00a0123-4567 or +44\u00a020\u00a07946\u00a00958 :-rrb-"),
        ("AT&T, S&P-500 and Q&A at www.example.com", "at&t s&p-500 and q&a at www.example.com"),
        ("ANTI-Σ 4x4Σ", "anti-ς 4x4ς"),  # a final capital sigma lower-cases to ς
    ],
)
def test_known_tokens(caption: str, tokens: str) -> None:
    assert tokenize(caption) == tokens


def test_line_breaks_inside_a_caption_are_spaces_and_do_not_shift_the_next() -> None:
    assert tokenize_captions(["a dog\rrunning", "a cat\u2028sitting", "two birds"]) == [
        "a dog running", "a cat sitting", "two birds"]  # fmt: skip
    assert ptb_tokenize_lines([]) == []


def test_the_next_caption_decides_a_final_initial() -> None:
    """As in the jar's one file: "I." before a caption opening a sentence ("The ...") is "i" then a period."""
    assert ptb_tokenize_lines(["a sign with the letter I.", "The dog"])[0] == "a sign with the letter i"
    assert ptb_tokenize_lines(["a sign with the letter I.", "the dog"])[0] == "a sign with the letter i."


def test_bleu4_and_cider_equal_pycocoevalcap(scores) -> None:
    predictions = [s["candidate"] for s in scores["sets"]]
    references = [s["references"] for s in scores["sets"]]
    per, corpus = get_metric("bleu4").compute(predictions, references)
    assert abs(corpus - scores["bleu"][3]) < 1e-9
    assert max(abs(a - b) for a, b in zip(per, scores["bleu4_per_image"], strict=True)) < 1e-9
    per, corpus = get_metric("cider").compute(predictions, references)
    assert abs(corpus - scores["cider"]) < 1e-9
    assert max(abs(a - b) for a, b in zip(per, scores["cider_per_image"], strict=True)) < 1e-9


def test_unknown_tokenizer_setting_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv(TOKENIZER_ENV, "perl")
    with pytest.raises(UserError, match="'python'.*'java'"):
        tokenize_captions(["a dog"])


def test_score_command_with_a_bad_tokenizer_setting_exits_2(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from florence_kit.cli import app

    path = tmp_path / "pred.jsonl"
    path.write_text(json.dumps({"prediction": "A dog (brown) runs.", "references": ["A brown dog runs."]}) + "\n")
    assert CliRunner().invoke(app, ["score", "caption", str(path), "--json"]).exit_code == 0
    monkeypatch.setenv(TOKENIZER_ENV, "perl")
    result = CliRunner().invoke(app, ["score", "caption", str(path), "--json"])
    assert result.exit_code == 2 and "FLORENCE_KIT_CAPTION_TOKENIZER='perl'" in result.output


def test_java_tokenizer_without_pycocoevalcap_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "pycocoevalcap.tokenizer.ptbtokenizer", None)
    with pytest.raises(UserError, match="pip install pycocoevalcap"):
        java_ptb_tokenize_lines(["a dog"])


HAS_JAVA = shutil.which("java") is not None
HAS_PYCOCOEVALCAP = importlib.util.find_spec("pycocoevalcap") is not None


@pytest.mark.skipif(not (HAS_JAVA and HAS_PYCOCOEVALCAP), reason="needs Java and pycocoevalcap ('.[dev]' has it)")
def test_java_backend_reproduces_the_fixture_and_the_scores(recorded, scores, monkeypatch) -> None:
    """The jar itself, live: it still gives the recorded tokens, agrees with florence-kit's tokenizer on fresh
    everyday captions, and FLORENCE_KIT_CAPTION_TOKENIZER=java scores as recorded."""
    sample = recorded[:300] + recorded[-300:]
    assert java_ptb_tokenize_lines([r["caption"] for r in sample]) == [r["tokens"] for r in sample]
    corpus = _load_corpus_module()
    rng = __import__("random").Random(2024)
    fresh = [corpus.hard_caption(rng) for _ in range(1000)]
    assert java_ptb_tokenize_lines(fresh) == ptb_tokenize_lines(fresh)
    monkeypatch.setenv(TOKENIZER_ENV, "java")
    predictions = [s["candidate"] for s in scores["sets"]]
    references = [s["references"] for s in scores["sets"]]
    assert abs(get_metric("cider").compute(predictions, references)[1] - scores["cider"]) < 1e-9
