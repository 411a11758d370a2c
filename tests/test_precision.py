"""--precision picks what the device can run; a non-finite loss skips its step, is counted, and stops a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from florence_kit.common.errors import UserError
from florence_kit.model.precision import DeviceFacts, resolve_precision
from florence_kit.train.runfolder import RunFolder

CPU = DeviceFacts(cuda=False, bf16=False)
T4 = DeviceFacts(cuda=True, bf16=False, name="Tesla T4")
A100 = DeviceFacts(cuda=True, bf16=True, name="NVIDIA A100")


@pytest.mark.parametrize(
    ("requested", "facts", "expected"),
    [
        ("auto", CPU, "fp32"), ("auto", T4, "fp16"), ("auto", A100, "bf16"),
        ("fp32", A100, "fp32"), ("bf16", CPU, "bf16"), ("fp16", T4, "fp16"), ("bf16", A100, "bf16"),
    ],
)
def test_precision_decision(requested, facts, expected):
    assert resolve_precision(requested, facts) == expected


def test_fp16_on_cpu_is_a_user_error_naming_the_fix():
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU.*fp32 or bf16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="auto, bf16, fp16, fp32"):
        resolve_precision("fp8", A100)


def test_cli_fp16_on_cpu_exits_2_before_writing(tiny_dir, docvqa_dir, tmp_path):
    from typer.testing import CliRunner

    from florence_kit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                      "--output-dir", str(out), "--precision", "fp16", "--max-steps", "1"])
    assert result.exit_code == 2
    assert "fp16 needs a CUDA GPU" in result.output
    assert not out.exists()


@pytest.fixture()
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a test with another mixed precision needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _loop(tiny_dir, docvqa_dir, task, tmp_path, **overrides):
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.model.loading import load_model
    from florence_kit.train.checkpoints import TrainState
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.loop import train_loop

    model, processor = load_model(str(tiny_dir))
    dataset = TaskDataset(load_split(task, str(docvqa_dir), "train"), task, with_target=True)
    settings = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, **overrides}
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=tmp_path, **settings)
    snapshots: list[dict[str, torch.Tensor]] = [{n: p.detach().clone() for n, p in model.named_parameters()}]

    def on_step(step, total, loss, lr):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})

    state = TrainState()
    try:
        result = train_loop(model, processor, dataset, cfg, RunFolder(tmp_path), on_step=on_step, state=state)
    except UserError as exc:
        result = exc
    return result, state, snapshots


def test_bf16_autocast_trains_on_cpu(tiny_dir, docvqa_dir, docvqa_task, tmp_path, fresh_accelerate_state):
    (steps, loss), _, snaps = _loop(tiny_dir, docvqa_dir, docvqa_task, tmp_path, precision="bf16", max_steps=2)
    assert steps == 2 and math.isfinite(loss)
    assert any(not torch.equal(snaps[0][n], snaps[-1][n]) for n in snaps[0])
    assert all(t.dtype == torch.float32 for t in snaps[-1].values())  # fp32 master weights, bf16 compute


def _nan_on_calls(monkeypatch, calls: set[int]) -> None:
    """Make ``forward_loss`` return NaN on the given (1-based) calls: a poisoned batch."""
    import florence_kit.train.loop as train

    original, count = train.forward_loss, [0]

    def poisoned(*args, **kwargs):
        count[0] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if count[0] in calls else loss

    monkeypatch.setattr(train, "forward_loss", poisoned)


def test_nonfinite_loss_skips_the_step_and_is_counted(tiny_dir, docvqa_dir, docvqa_task, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2})
    (steps, loss), state, snaps = _loop(tiny_dir, docvqa_dir, docvqa_task, tmp_path)
    assert steps == 4 and math.isfinite(loss)
    assert state.nonfinite_steps == 1 and state.nonfinite_in_a_row == 0
    changed = [any(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(snaps, snaps[1:], strict=False)]
    assert changed == [True, False, True, True]  # step 2 left every weight bit-identical
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1] == {"step": 2, "loss": None, "skipped": "non-finite loss", "nonfinite_steps": 1}
    assert all(r["loss"] is not None for r in records if r["step"] != 2)


def test_nonfinite_losses_in_a_row_stop_the_run(tiny_dir, docvqa_dir, docvqa_task, tmp_path, monkeypatch):
    from florence_kit.train.loop import NONFINITE_LIMIT

    _nan_on_calls(monkeypatch, set(range(1, 100)))
    error, state, snaps = _loop(tiny_dir, docvqa_dir, docvqa_task, tmp_path, max_steps=20)
    assert isinstance(error, UserError)
    assert f"NaN/inf in {NONFINITE_LIMIT} consecutive steps" in str(error) and "--lr" in str(error)
    assert state.step == NONFINITE_LIMIT and state.nonfinite_steps == NONFINITE_LIMIT
    assert all(torch.equal(snaps[0][n], snaps[-1][n]) for n in snaps[0])  # no update was applied
    assert len(Path(tmp_path / "metrics.jsonl").read_text().splitlines()) == NONFINITE_LIMIT
