"""Evaluation as a library call (``run_eval``): eval and predict answer through one engine, so the same images and
prompts get the same answers; several tasks give one result each, their folders and summary.json.

The model is the tiny random Florence-2 with its cross-attention output scaled up 3x, so that answers depend on
each example's image and prompt (checked: at least three distinct answers), and questions of very different lengths
make batches pad a lot.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from florence_kit.cli import app

QUESTIONS = ["total?", "What is the date written at the top of the invoice, just under the sender's address?",
             "amount", "name of the person who signed", "a", "What is the reference number on this page?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    import torch

    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny(seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "encoder_attn.out_proj" in name:
                param.mul_(3.0)
    out = tmp_path_factory.mktemp("scaled") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, docvqa_splits):
    """The synthetic DocVQA splits with varied questions: two questions per page, so pages repeat."""
    varied = docvqa_splits.map(lambda row, i: {"question": QUESTIONS[i % len(QUESTIONS)]}, with_indices=True)
    out = tmp_path_factory.mktemp("varied") / "data"
    varied.save_to_disk(str(out))
    return out


def test_eval_predictions_equal_predict_answers(model_dir, data_dir, tmp_path):
    from florence_kit.evaluate import run_eval

    run = run_eval(str(model_dir), "docvqa", dataset=str(data_dir), output_dir=tmp_path / "eval", batch_size=3,
                   max_new_tokens=8, num_workers=1)
    written = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [rec["prediction"] for rec in written] == [rec["prediction"] for rec in run.results["docvqa"].predictions]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == run.metrics["docvqa"]
    assert len(list((tmp_path / "eval" / "thumbs").glob("*.jpg"))) == len(written)

    out = tmp_path / "predict.jsonl"
    result = CliRunner().invoke(app, ["predict", "--dataset", str(data_dir), "--split", "validation",
                                      "--question-column", "question", "--task", "docvqa", "--model", str(model_dir),
                                      "--output", str(out), "--batch-size", "5", "--max-new-tokens", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["row"] for rec in predicted] == list(range(len(written)))
    assert [rec["prompt"] for rec in predicted] == [rec["prompt"] for rec in written]
    answers = [rec["text"] for rec in predicted]
    assert len(set(answers)) >= 3, answers  # answers depend on the input: a mix-up would show
    assert answers == [rec["prediction"] for rec in written]


def test_several_tasks_each_scored_into_its_folder_with_a_summary(model_dir, data_dir, docvqa_task, tmp_path):
    from florence_kit.common.errors import UserError
    from florence_kit.evaluate import run_eval
    from florence_kit.model.loading import load_model

    local = replace(docvqa_task.dataset, path=str(data_dir))
    tasks = [replace(docvqa_task, name="first", dataset=local), replace(docvqa_task, name="second", dataset=local)]
    pair = load_model(str(model_dir))
    seen = []
    run = run_eval(pair, tasks, max_samples=4, output_dir=tmp_path / "out", max_new_tokens=4,
                   on_result=lambda spec, result: seen.append((spec.name, result.metrics["n"])))
    assert seen == [("first", 4), ("second", 4)]
    assert list(run.metrics) == ["first", "second"]
    assert run.metrics["first"]["anls"] == run.metrics["second"]["anls"]  # the same rows, model and settings
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == run.summary
    assert run.summary["tasks"]["second"]["folder"] == "second"
    for name in ("first", "second"):
        assert json.loads((tmp_path / "out" / name / "metrics.json").read_text()) == run.metrics[name]

    # one task into the same folder: the old summary.json goes (the report would show it instead)
    single = run_eval(pair, tasks[:1], max_samples=2, output_dir=tmp_path / "out", max_new_tokens=4)
    assert single.metrics["first"]["n"] == 2 and not (tmp_path / "out" / "summary.json").exists()
    # no output folder: nothing written, the results returned
    assert run_eval(pair, tasks[:1], max_samples=2, max_new_tokens=4).output_dir is None

    with pytest.raises(UserError, match="--dataset names one task's data"):
        run_eval(pair, tasks, dataset=str(data_dir), max_samples=2)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_stops_eval_naming_its_row(tiny_dir, tmp_path, num_workers):
    """predict counts and skips an unreadable image; eval must not score a split with rows left out."""
    import numpy as np
    from PIL import Image

    from florence_kit.common.errors import UserError
    from florence_kit.evaluate import run_eval

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "good.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])
    rows = [{"image": name, "question": "q?", "answers": ["a"]} for name in ("good.png", "cut.jpg")]
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError, match=r"^row 1: image cannot be read \(OSError: .*\); fix or remove that row$"):
        run_eval(str(tiny_dir), "docvqa", dataset=str(tmp_path), max_new_tokens=4, num_workers=num_workers)
