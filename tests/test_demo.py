"""The demo's plumbing (fast, few steps) and its answer-prior baseline on hand-made data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.demo.run_demo import answer_prior, prior_scores


def test_answer_prior_is_the_most_frequent_training_answer_per_question() -> None:
    train = {"question": ["q1", "q1", "q1", "q2"], "answers": [["10"], ["11"], ["10"], ["99"]]}
    evals = {"question": ["q1", "q2", "q3"], "answers": [["10"], ["98"], ["10"]]}
    assert answer_prior(train, evals) == ["10", "99", "10"]  # unseen question -> overall most frequent
    scores = prior_scores(train, evals)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["anls"] == pytest.approx((1 + 0.5 + 1) / 3)  # "99" vs "98": 1 - 1/2 = 0.5 is kept


def test_demo_runs_end_to_end_and_writes_its_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out), "--steps", "2", "--train-docs", "8",
                                      "--eval-docs", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo.json").read_text())
    assert summary["train_steps"] == 2 and summary["held_out_questions"] > 0
    assert set(summary["anls"]) == {"before", "after"} and 0 <= summary["answer_prior"]["anls"] <= 1
    for sub in ("eval-before", "eval-after"):
        assert (out / sub / "predictions.jsonl").is_file() and (out / sub / "metrics.json").is_file()
    assert (out / "finetuned" / "model.safetensors").is_file()
    assert "answer prior" in result.stdout and "ANLS" in result.stdout
