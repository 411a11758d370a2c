"""Modes freeze for real, padding never trains, and the length preflight catches what will not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from florence_kit.common.errors import UserError
from florence_kit.data.collate import IGNORE_INDEX, Collator, max_positions, preflight
from florence_kit.data.dataset import Example, TaskDataset, load_split
from florence_kit.model.loading import load_model
from florence_kit.model.modes import Mode, apply_mode, component, trainable_counts
from florence_kit.train.config import TrainConfig
from florence_kit.train.loop import train_loop
from florence_kit.train.runfolder import RunFolder
from florence_kit.train.step import make_optimizer


def _train(tiny_dir: Path, docvqa_dir: Path, task, tmp_path: Path, mode: str, hook=None):
    model, processor = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if hook:
        component(model, "vision").register_forward_hook(hook)
    dataset = TaskDataset(load_split(task, str(docvqa_dir), "train"), task, with_target=True)
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=tmp_path, mode=mode, max_steps=2,
                      batch_size=4, lr=1e-3, log_every=1)
    steps, loss = train_loop(model, processor, dataset, cfg, RunFolder(tmp_path))
    assert steps == 2 and loss == loss  # not NaN
    changed = {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}
    return model, changed


def _changed(changed: dict[str, bool], prefix: str) -> list[bool]:
    values = [v for n, v in changed.items() if n.startswith(prefix)]
    assert values, prefix
    return values


def test_frozen_encoder_leaves_every_vision_weight_bit_identical(tiny_dir, docvqa_dir, docvqa_task, tmp_path):
    grad_modes = []
    model, changed = _train(
        tiny_dir, docvqa_dir, docvqa_task, tmp_path, "frozen-encoder",
        hook=lambda mod, inp, out: grad_modes.append((torch.is_grad_enabled(), mod.training)),
    )
    assert not any(_changed(changed, "model.vision_tower."))
    assert any(_changed(changed, "model.language_model.encoder."))
    assert any(_changed(changed, "model.language_model.decoder."))
    assert any(_changed(changed, "model.multi_modal_projector."))
    assert grad_modes and all(g == (False, False) for g in grad_modes)  # no_grad and eval mode
    assert all(not p.requires_grad for p in component(model, "vision").parameters())


def test_full_mode_changes_vision_and_language(tiny_dir, docvqa_dir, docvqa_task, tmp_path):
    _, changed = _train(tiny_dir, docvqa_dir, docvqa_task, tmp_path, "full")
    assert any(_changed(changed, "model.vision_tower."))
    assert any(_changed(changed, "model.language_model."))
    log = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"loss"' in log[0] and '"lr"' in log[0]


def test_frozen_parameters_get_no_optimizer_state(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    apply_mode(model, Mode.frozen_encoder)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    vision = list(component(model, "vision").parameters())
    assert not any(id(p) in in_optimizer for p in vision)
    counts = trainable_counts(model)
    assert counts["vision"][0] == 0 and counts["vision"][1] == sum(p.numel() for p in vision)
    assert counts["language"][0] == counts["language"][1] > 0
    apply_mode(model, Mode.full)
    assert trainable_counts(model)["vision"][0] == counts["vision"][1]


def test_adamw_is_fused_where_it_runs_and_updates_as_foreach_does(monkeypatch):
    """make_optimizer picks torch's fused AdamW (CPU and CUDA), whose updates equal the foreach one's to float
    rounding; where torch refuses the fused kernel (a device without it) it falls back to foreach."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(64)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    results = {}
    for fused in (True, False):
        model = torch.nn.Linear(32, 64)
        with torch.no_grad():
            model.weight.copy_(weights[0])
            model.bias.copy_(weights[1])
        optimizer = make_optimizer(model, 1e-2, 0.01) if fused else torch.optim.AdamW(
            [{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias], "weight_decay": 0.0}],
            lr=1e-2, foreach=True)
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        for step in grads:
            model.weight.grad, model.bias.grad = (g.clone() for g in step)
            optimizer.step()
        results[fused] = [model.weight.detach().clone(), model.bias.detach().clone()]
    # the same arithmetic, another association (fused multiply-adds): each of the 4 updates rounds w (|w| < 5)
    # a few ulps apart, <= ~1e-6 relative after 4 steps. A missed weight decay or bias correction: > 1e-4.
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(results[True], results[False], strict=True))
    real = torch.optim.AdamW

    def no_fused_kernel(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)
    fallback = make_optimizer(torch.nn.Linear(4, 4), 1e-3, 0.0).param_groups[0]
    assert not fallback["fused"] and fallback["foreach"]


def test_label_padding_is_minus_100(tiny_dir, docvqa_splits):
    _, processor = load_model(str(tiny_dir))
    image = docvqa_splits["train"][0]["image"].convert("RGB")
    targets = ["7", "12345", "ab"]
    batch = Collator(processor, max_length=1024)([Example(str(i), image, "<DocVQA>q?", t, [t])
                                                  for i, t in enumerate(targets)])
    labels = batch["labels"]
    for row, target in zip(labels, targets, strict=True):
        ids = processor.tokenizer(target)["input_ids"]
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids):] == IGNORE_INDEX).all()
    assert (labels == processor.tokenizer.pad_token_id).sum() == 0
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 3


def test_length_preflight_drop_truncate_error(tiny_dir, docvqa_splits, docvqa_task):
    model, processor = load_model(str(tiny_dir))
    rows = docvqa_splits["train"].to_dict()
    rows["question"][2] = "why " * 400  # 1600 characters -> far beyond 1024 positions
    ds = docvqa_splits["train"].from_dict(rows, features=docvqa_splits["train"].features)
    data = TaskDataset(ds, docvqa_task, with_target=True)
    limit = max_positions(model.config)
    report = preflight(data.texts(), processor, limit, "drop")
    assert report.too_long == [2] and 2 not in report.keep and len(report.keep) == len(ds) - 1
    assert preflight(data.texts(), processor, limit, "truncate").keep == list(range(len(ds)))
    with pytest.raises(UserError, match="1 example"):
        preflight(data.texts(), processor, limit, "error")
    batch = Collator(processor, max_length=limit, truncate=True)([data[2], data[0]])
    assert batch["input_ids"].shape[1] == limit
    assert (batch["input_ids"][0] == model.config.image_token_id).sum() == processor.num_image_tokens


def test_warmup_schedules() -> None:
    from florence_kit.train.step import warmup_schedule

    cos = warmup_schedule("cosine", 4, 14)
    assert [round(cos(s), 3) for s in (0, 3)] == [0.2, 0.8]  # linear warmup
    assert cos(4) == pytest.approx(1.0) and cos(9) == pytest.approx(0.5) and cos(14) == pytest.approx(0.0)
    lin = warmup_schedule("linear", 0, 10)
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert warmup_schedule("constant", 2, 10)(7) == 1.0


def test_logged_lr_is_the_one_each_step_trained_with(tiny_dir, docvqa_dir, docvqa_task, tmp_path, monkeypatch):
    """metrics.jsonl and the progress line show step N's learning rate, not the next step's."""
    import json

    model, processor = load_model(str(tiny_dir))
    dataset = TaskDataset(load_split(docvqa_task, str(docvqa_dir), "train"), docvqa_task, with_target=True)
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=tmp_path, max_steps=3, batch_size=4, lr=1e-3,
                      warmup_steps=1, log_every=1)
    seen: list[float] = []
    used: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train_loop(model, processor, dataset, cfg, RunFolder(tmp_path),
               on_step=lambda s, total, loss, lr: seen.append(lr))
    logged = [r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert used == pytest.approx([5e-4, 1e-3, 5e-4])  # warmup 1/2, then linear decay over 2 steps
    assert logged == pytest.approx(used) and seen == pytest.approx(used)
