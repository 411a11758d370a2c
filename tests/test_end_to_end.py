"""The whole path on a float16 checkpoint: convert → finetune (full and LoRA) → eval → predict, through the CLI.

Hub Florence-2 weights are float16, so this is the path most users take. CI runs this file under the newest
dependencies and again under the lowest versions pyproject.toml allows (.ci/lowest-tests.txt).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from florence_kit.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "ms_florence"
runner = CliRunner()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "fp16"
    result = runner.invoke(app, ["convert", str(FIXTURE / "model"), str(out), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float16}
    return out


def finetune(model: Path, data: Path, out: Path, mode: str) -> None:
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(model), "--dataset", str(data),
                                 "--output-dir", str(out), "--mode", mode, "--max-steps", "2", "--batch-size", "2",
                                 "--lr", "1e-4", "--seed", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)


def test_fp16_checkpoint_trains_in_float32_then_evaluates_and_predicts(
    fp16_model: Path, docvqa_dir: Path, docvqa_splits, tmp_path: Path
) -> None:
    run = tmp_path / "full"
    finetune(fp16_model, docvqa_dir, run, "full")
    before = load_file(str(fp16_model / "model.safetensors"))
    after = load_file(str(run / "model.safetensors"))
    # trained on float32 master weights: a 16-bit copy would round most of these small updates away
    assert {t.dtype for t in after.values()} == {torch.float32}
    moved = sum(int((after[k] != before[k].float()).sum()) for k in before)
    assert moved / sum(t.numel() for t in before.values()) > 0.5

    result = runner.invoke(app, ["eval", "docvqa", "--model", str(run), "--dataset", str(docvqa_dir),
                                 "--max-samples", "3", "--output-dir", str(tmp_path / "eval"), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert metrics["n"] == len(predictions) == 3 and 0.0 <= metrics["anls"] <= 1.0

    image = tmp_path / "page.png"
    docvqa_splits["validation"][0]["image"].save(image)
    result = runner.invoke(app, ["predict", str(image), "--model", str(run), "--question", "What is the total?"])
    assert result.exit_code == 0, result.output


def test_lora_on_an_fp16_base_trains_and_predicts(fp16_model: Path, docvqa_dir: Path, docvqa_splits,
                                                  tmp_path: Path) -> None:
    run = tmp_path / "lora"
    finetune(fp16_model, docvqa_dir, run, "lora")
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in adapter.items())  # B starts at zero

    image = tmp_path / "page.png"
    docvqa_splits["validation"][0]["image"].save(image)
    result = runner.invoke(app, ["predict", str(image), "--model", str(run), "--question", "What is the total?"])
    assert result.exit_code == 0, result.output
