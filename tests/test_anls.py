"""ANLS as the official DocVQA script computes it, on hand-checked cases (including its edges)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.metrics import get_metric
from florence_kit.metrics.anls import anls


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("1990", ["1990"], 1.0),
        ("  The  TOTAL ", ["the total"], 1.0),  # strip, lower-case, collapse whitespace
        ("abcd", ["abce"], 0.75),  # distance 1 over length 4
        ("ab", ["abcd"], 0.5),  # exactly the threshold: kept, not zeroed
        ("a", ["abc"], 0.0),  # 1 - 2/3 = 0.333 < 0.5 -> 0
        ("", [""], 1.0),  # two empty strings score 1
        ("", ["abc"], 0.0),
        ("abc", [""], 0.0),
        ("cat", ["dog", "cat", "cot"], 1.0),  # best reference wins
        ("abce", ["abcd  "], 1 - 1 / 6),  # normaliser = longer RAW string (6), not the stripped one (4)
        ("ABCE", ["abcd"], 0.75),
    ],
)
def test_anls_hand_checked(prediction: str, references: list[str], expected: float) -> None:
    assert anls(prediction, references) == pytest.approx(expected)


def test_anls_needs_a_reference() -> None:
    with pytest.raises(ValueError):
        anls("x", [])


def test_task_score_is_the_mean() -> None:
    metric = get_metric("anls")
    scores = [metric.score(p, r) for p, r in [("a", ["a"]), ("abcd", ["abce"]), ("x", ["yyy"])]]
    assert metric.aggregate(scores) == pytest.approx((1 + 0.75 + 0) / 3)


def test_score_command_rescoring_a_file(tmp_path) -> None:
    path = tmp_path / "pred.jsonl"
    rows = [{"prediction": "abcd", "references": ["abce"]}, {"prediction": "1 1 0", "references": ["1 1 0"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = CliRunner().invoke(app, ["score", "docvqa", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"anls": pytest.approx(0.875)}


def test_score_command_rejects_a_malformed_file(tmp_path) -> None:
    path = tmp_path / "pred.jsonl"
    path.write_text('{"prediction": "a"}\n')
    result = CliRunner().invoke(app, ["score", "docvqa", str(path)])
    assert result.exit_code == 2
    assert "references" in result.output


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "holds no predictions"),
        (b"\n  \n", "holds no predictions"),
        (b'{"prediction": "a", "references": ["a"]}\n{"prediction": "caf\xe9", "references": ["x"]}\n',
         ":2: not UTF-8 text (byte 0xe9 at column 20)"),
        (b'{"prediction": "a", "references": ["a"]}\n{"prediction": "1990", "references": [1990]}\n',
         ":2: 'references' must be a list of JSON strings"),
        (b'{"prediction": "a", "references": [["a", "b"]]}\n', ":1: 'references' must be a list"),
        (b'{"prediction": "a", "references": 7}\n', ":1: 'references' must be a list"),
        (b'{"prediction": null, "references": ["a"]}\n', ":1: 'prediction' must be a JSON string"),
        (b'{"prediction": 12, "references": ["12"]}\n', ":1: 'prediction' must be a JSON string"),
    ],
)
def test_score_command_names_the_line_of_a_hand_edited_file(tmp_path, body: bytes, expected: str) -> None:
    """Each is one error line and exit 2: no traceback, no silent "n/a", no None scored as the text "None"."""
    path = tmp_path / "pred.jsonl"
    path.write_bytes(body)
    result = CliRunner().invoke(app, ["score", "docvqa", str(path)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_score_command_keeps_rows_without_answers_unscored(tmp_path) -> None:
    path = tmp_path / "pred.jsonl"
    rows = [{"prediction": "abcd", "references": "abce"}, {"prediction": "x", "references": None},
            {"prediction": "", "references": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["score", "docvqa", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"anls": pytest.approx(0.75)}
