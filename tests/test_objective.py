"""florence-kit trains Microsoft's objective: the loss and gradients equal those of Microsoft's own code.

tests/fixtures/ms_florence/loss/ holds what Microsoft's remote code (transformers 4.49) computed on four
DocVQA-schema rows of the recorded Microsoft-format model (record_loss.py says how): the labelled batch,
its loss, the sums of two micro-batches and the gradients of seven parameters spread over the model.
``masked`` is that code with the prompt's padding masked: each row's loss is then exactly the loss
Microsoft's plain forward gives the row alone, unpadded (``per_row``). (Microsoft's forward as called,
``recipe``, lets the encoder attend to the prompt's padding, so it depends on how rows are batched.)

The model is the converted fixture with its dropout set to 0, so a training step's loss is deterministic.
Every path that computes the loss its own way is checked: the plain forward, the frozen tower's
embeddings path with and without the feature cache, LoRA, gradient accumulation (the division by the
global batch's token count) and two processes. None of it depends on which transformers computes
``model(...).loss``: transformers 5.0-5.12 shift the labels a second time there.

Tolerances: the reference ran the same float32 arithmetic through other modules; reductions summed in
another order differ by a few float32 ulps per term. 1e-4 relative on a loss of ~29 (about 100 ulps of
the sum over 51 tokens) leaves two orders of magnitude to spare while a shifted label (another
objective: 11.17 against 13.44 on a similar model) or a token too many or too few in the division
(~2 % here) is far outside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from florence_kit.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "ms_florence"
LOSS = FIXTURE / "loss"
REF = json.loads((LOSS / "reference.json").read_text())
RTOL = 1e-4  # see the module docstring
IMAGE_TOKENS = json.loads((FIXTURE / "golden.json").read_text())["image_seq_length"]  # <image> ids before the prompt


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture converted by ``florence-kit convert``, dropout and drop-path set to 0."""
    out = tmp_path_factory.mktemp("objective") / "native"
    result = CliRunner().invoke(app, ["convert", str(FIXTURE / "model"), str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        config["text_config"][key] = 0.0
    config["vision_config"]["drop_path_rate"] = 0.0
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(LOSS / "reference.safetensors"))


def _batch(converted: Path, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    """florence-kit's own collate over the recorded rows."""
    from florence_kit.data.collate import Collator
    from florence_kit.data.dataset import TaskDataset, load_source
    from florence_kit.model.loading import load_model
    from florence_kit.tasks.registry import get_task

    _, processor = load_model(str(converted))
    data = TaskDataset(load_source(str(LOSS / "rows.jsonl"))["train"], get_task("docvqa"), with_target=True)
    examples = [data[i] for i in range(len(data))][rows]
    return dict(Collator(processor, max_length=128)(examples))


def test_collate_builds_microsofts_batch(converted, reference):
    """input_ids (after the image tokens), mask, labels and pixels equal what Microsoft's processor made."""
    for prefix, rows in (("", slice(None)), ("mb0.", slice(0, 2)), ("mb1.", slice(2, 4))):
        batch = _batch(converted, rows)
        n_image = batch["input_ids"].shape[1] - reference[prefix + "input_ids"].shape[1]
        assert n_image == IMAGE_TOKENS
        assert torch.equal(batch["input_ids"][:, n_image:], reference[prefix + "input_ids"])
        assert torch.equal(batch["attention_mask"][:, n_image:], reference[prefix + "attention_mask"])
        assert bool(batch["attention_mask"][:, :n_image].all())
        assert torch.equal(batch["labels"], reference[prefix + "labels"])
    assert torch.equal(_batch(converted)["pixel_values"], reference["pixel_values"])


@pytest.mark.parametrize("frozen_vision", [False, True], ids=["full", "frozen-encoder"])
def test_loss_and_gradients_equal_microsofts(converted, reference, frozen_vision):
    from florence_kit.model.loading import load_model
    from florence_kit.train.step import forward_loss

    model, _ = load_model(str(converted))
    model.eval()  # dropout is 0 anyway; eval() also keeps DaViT's drop-path out
    loss = forward_loss(model, _batch(converted), frozen_vision)
    expected = REF["masked"]["loss"]
    assert abs(loss.item() - expected) <= RTOL * expected, (loss.item(), expected)
    loss.backward()

    params = dict(model.named_parameters())
    for ms_name, spec in REF["parameters"].items():
        if "masked" not in spec["variants"]:
            continue
        if frozen_vision and spec["native"].startswith("model.vision_tower"):
            assert params[spec["native"]].grad is None  # the frozen tower gets no gradient at all
            continue
        grad = params[spec["native"]].grad
        grad = grad.T if spec["transpose"] else grad
        ref = reference[f"grad.masked.{ms_name}"]
        if f"grad_rows.masked.{ms_name}" in reference:  # sparse rows of an embedding: the rest are zero
            rows = reference[f"grad_rows.masked.{ms_name}"].long()
            mine = grad[: REF["vocab_size"]]
            assert float(mine[[i for i in range(mine.shape[0]) if i not in set(rows.tolist())]].abs().max()) == 0.0
            grad = mine[rows]
        elif grad.shape[0] != ref.shape[0]:  # the native head pads the vocabulary: compare Microsoft's rows
            grad = grad[: ref.shape[0]]
        scale = float(ref.abs().max())
        diff = float((grad - ref).abs().max())
        # float32 gradients summed in another order: a few ulps of the largest entry, here 1e-6 relative
        assert diff <= RTOL * scale, (ms_name, diff, scale)


def _step_one_loss(converted: Path, out: Path, **options) -> float:
    """The step-1 loss a one-step ``finetune docvqa`` run logs (the loss before the update)."""
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.recipe import finetune

    cfg = TrainConfig(task="docvqa", model=str(converted), dataset=str(LOSS / "rows.jsonl"), output_dir=out,
                      max_steps=1, log_every=1, **{"batch_size": 4, **options})
    result = finetune(cfg, quiet=True, print_fn=lambda *_: None)
    return _logged_loss(result.output_dir)


def _logged_loss(run: Path) -> float:
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    return first["loss"]


PATHS = {
    "full": {"mode": "full", "speed": "off"},
    "frozen-encoder, embeddings path": {"mode": "frozen-encoder", "speed": "off"},
    "frozen-encoder, feature cache": {"mode": "frozen-encoder", "speed": "off", "cache_vision_features": True},
    "frozen-encoder, fast path (store, cache, page grouping)": {"mode": "frozen-encoder"},
    "lora": {"mode": "lora", "speed": "off"},
    "grad-accum 2 x 2": {"mode": "full", "speed": "off", "batch_size": 2, "grad_accum": 2},
}


@pytest.mark.parametrize("options", PATHS.values(), ids=PATHS.keys())
def test_training_loss_equals_microsofts(converted, tmp_path, options):
    loss = _step_one_loss(converted, tmp_path / "run", **options)
    expected = REF["masked"]["loss"]
    assert abs(loss - expected) <= RTOL * expected, (loss, expected)


def test_two_process_training_loss_equals_microsofts(converted, tmp_path):
    """Two processes of two rows each: the loss is divided by the token count of the whole global batch."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "florence_kit.cli", "finetune", "docvqa", "--model", str(converted),
              "--dataset", str(LOSS / "rows.jsonl"), "--batch-size", "2", "--max-steps", "1", "--speed", "off",
              "--quiet", "--output-dir", str(out)]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    expected = REF["masked"]["loss"]
    assert abs(_logged_loss(out) - expected) <= RTOL * expected
