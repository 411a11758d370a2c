"""Gradient checkpointing is exact and saves memory; the memory model and planner behave; --fit auto runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.model.activation_checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from florence_kit.model.memory import (
    GPUS,
    MODES,
    Budget,
    Setting,
    Shape,
    estimate,
    fit,
    image_tokens,
    load_config,
    plan_modes,
    sizes,
)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return sizes(load_config("base"))


def _tiny_with_dropout():
    """Tiny model with two DaViT blocks, drop-path and dropout on: checkpointing must replay the same masks."""
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.tiny import tiny_config

    config = tiny_config(vision_depths=(2,), vision_drop_path_rate=0.2, dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).train()
    batch = {
        "input_ids": torch.cat([torch.full((2, 17), config.image_token_id), torch.randint(5, 200, (2, 6))], 1),
        "pixel_values": torch.randn(2, 3, 128, 128),
        "labels": torch.randint(5, 200, (2, 5)),
    }
    return model, batch


def _grads_and_saved_bytes(model, batch) -> tuple[dict[str, torch.Tensor], int]:
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, sum(b for ptr, b in saved.items() if ptr not in params)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(tmp_path):
    model, batch = _tiny_with_dropout()
    plain, plain_bytes = _grads_and_saved_bytes(model, batch)
    counts = enable_gradient_checkpointing(model)
    assert counts == {"vision": 2, "language": 4}  # both DaViT blocks, 2 encoder + 2 decoder BART layers
    ckpt, ckpt_bytes = _grads_and_saved_bytes(model, batch)
    assert plain.keys() == ckpt.keys() and any(n.startswith("model.vision_tower.blocks") for n in ckpt)
    worst = max(float((ckpt[n] - plain[n]).abs().max() / plain[n].abs().max().clamp_min(1e-30)) for n in plain)
    print(f"checkpointed vs plain gradients: worst |diff| / max |grad| per tensor = {worst:.3g}")
    # the recomputed forward runs the same kernels on the same inputs (dropout replays its RNG state); only the order
    # in which autograd adds a shared weight's contributions can change: a few float32 ulps (2**-24 = 6e-8) of
    # the gradient. A recomputation with fresh dropout masks changes gradients by ~10%.
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert ckpt_bytes < 0.6 * plain_bytes  # autograd keeps far less between forward and backward
    disable_gradient_checkpointing(model)
    again, again_bytes = _grads_and_saved_bytes(model, batch)
    assert again_bytes == plain_bytes


def test_builtin_configs_have_florence2_sizes(base):
    large = sizes(load_config("large"))
    assert 0.22e9 < base.total < 0.24e9 and 0.76e9 < large.total < 0.78e9
    assert image_tokens(load_config("base"), 768) == 577
    # lora targets: 6 per encoder layer, 10 per decoder layer (self- and cross-attention)
    assert len(base.lora_targets) == 6 * 6 + 10 * 6


def test_memory_model_orders_modes_and_grows_with_batch(base):
    shape = Shape(768, 32, 64)
    peaks = {m: [estimate(base, Setting(m, b), shape).peak for b in (1, 2, 4, 8)] for m in MODES}
    for mode, values in peaks.items():
        assert values == sorted(values) and values[0] < values[-1], mode
    for b in range(4):
        assert peaks["qlora"][b] < peaks["lora"][b] < peaks["frozen-encoder"][b] < peaks["full"][b]
    for mode in MODES:
        plain = estimate(base, Setting(mode, 4), shape)
        ckpt = estimate(base, Setting(mode, 4, checkpointing=True), shape)
        assert ckpt.activations < plain.activations and ckpt.peak < plain.peak
    # mixed precision: activations shrink, fp32 master weights, grads and Adam state stay
    fp32, bf16 = estimate(base, Setting("full", 4), shape), estimate(base, Setting("full", 4, precision="bf16"), shape)
    assert bf16.activations < fp32.activations and bf16.grads == fp32.grads and bf16.optimizer == fp32.optimizer
    # 8-bit AdamW: a quarter of the optimizer state
    assert estimate(base, Setting("full", 1, optim="adamw8bit"), shape).optimizer == pytest.approx(
        fp32.optimizer / 4)


def test_fit_reaches_the_effective_batch_and_checkpoints_only_when_needed(base):
    shape, t4 = Shape(768, 32, 64), GPUS["t4"].memory * 0.95
    for f in plan_modes(base, shape, Budget("t4", t4, "cuda", "fp16"), 8):
        assert f.fits and f.micro_batch * f.grad_accum == 8 and f.peak <= t4
        assert f.max_batch >= f.micro_batch
    # a budget where batch 1 fits only with checkpointing
    plain1 = estimate(base, Setting("full", 1), shape).peak
    ckpt1 = estimate(base, Setting("full", 1, checkpointing=True), shape).peak
    tight = fit(base, Setting("full"), shape, (plain1 + ckpt1) / 2, "cpu", 6)
    assert tight.checkpointing and tight.micro_batch >= 1 and tight.micro_batch * tight.grad_accum == 6
    assert not fit(base, Setting("full"), shape, ckpt1 / 2, "cpu", 6).fits


def test_plan_prints_every_mode_for_a_t4_and_an_h100():
    for gpu, precision in (("t4", "fp16"), ("h100", "bf16")):
        result = runner.invoke(app, ["plan", "docvqa", "--model", "base", "--gpu", gpu])
        assert result.exit_code == 0, result.output
        assert f"{precision} mixed precision" in result.output and "577 image tokens" in result.output
        rows = [line for line in result.output.splitlines() if line.split(" ")[0] in MODES]
        assert [r.split()[0] for r in rows] == list(MODES)
        assert all("batch" in r and "accumulation" in r for r in rows)
    result = runner.invoke(app, ["plan", "docvqa", "--model", "large", "--gpu", "t4", "--mode", "full"])
    assert result.exit_code == 2 and "does not fit" in result.output
    result = runner.invoke(app, ["plan", "docvqa", "--model", "no/such/folder", "--gpu", "t4"])
    assert result.exit_code == 2 and "config.json" in result.output


@pytest.mark.parametrize(("option", "value"), [("--image-size", "-64"), ("--image-size", "0"),
                                               ("--target-tokens", "0"), ("--prompt-tokens", "-1"),
                                               ("--lora-r", "0")])
def test_plan_refuses_sizes_that_make_no_sense(option, value):
    result = runner.invoke(app, ["plan", "docvqa", "--model", "base", "--gpu", "t4", option, value])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {option} must be at least {0 if option == '--prompt-tokens' else 1}, " \
        f"got {value}"


def test_plan_reads_a_checkpoint_folder(tiny_dir):
    result = runner.invoke(app, ["plan", "docvqa", "--model", str(tiny_dir), "--gpu", "l4", "--mode", "lora"])
    assert result.exit_code == 0, result.output
    assert "128×128: 17 image tokens" in result.output


@pytest.mark.parametrize("kind", ["bert", "remote code"])
def test_plan_refuses_a_folder_that_is_not_a_native_florence2(tiny_dir, tmp_path, kind):
    """Florence2Config.from_pretrained fills any config.json with defaults: the plan would be for another model."""
    config = json.loads((tiny_dir / "config.json").read_text())
    if kind == "bert":
        config = {"model_type": "bert", "hidden_size": 768}
    else:
        config["vision_config"]["model_type"] = "davit"
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["plan", "docvqa", "--model", str(tmp_path), "--gpu", "t4"])
    assert result.exit_code == 2, result.output
    assert ("not a Florence-2 checkpoint" if kind == "bert" else "remote-code") in result.output


def test_finetune_fit_auto_splits_the_batch_to_fit(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    """With a budget that fits two samples, an effective batch of 4 becomes 2 × accumulation 2."""
    import florence_kit.model.memory as memory

    s = memory.sizes(load_config(str(tiny_dir)))
    shape = Shape(128, 600, 100)
    two = estimate(s, Setting("full", 2), shape).peak
    three = estimate(s, Setting("full", 3), shape).peak
    monkeypatch.setattr(memory, "local_budget", lambda precision=None: Budget("test", (two + three) / 2, "cpu", "fp32"))
    monkeypatch.setattr(memory, "text_lengths", lambda processor, rows: (600, 100))
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--fit", "auto",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "effective batch 4 = batch 2 × accumulation 2" in " ".join(result.output.split())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["fit"]) == (2, 2, "auto")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["samples"] == 8


def test_finetune_fit_auto_resume_reuses_the_runs_split(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    """On resume --fit auto keeps the checkpoint's batch × accumulation (and checkpointing): the RAM free now
    would pick another split (here checkpointing + another micro-batch), which the fingerprint refuses."""
    import florence_kit.model.memory as memory

    s = memory.sizes(load_config(str(tiny_dir)))
    shape = Shape(128, 600, 100)
    two, three = (estimate(s, Setting("full", b), shape).peak for b in (2, 3))
    plain1, ckpt1 = (estimate(s, Setting("full", 1, checkpointing=c), shape).peak for c in (False, True))
    budgets = iter([(two + three) / 2, (plain1 + ckpt1) / 2])  # the first run's, then less RAM free at resume
    monkeypatch.setattr(memory, "local_budget", lambda precision=None: Budget("test", next(budgets), "cpu", "fp32"))
    monkeypatch.setattr(memory, "text_lengths", lambda processor, rows: (600, 100))
    out = tmp_path / "run"
    args = ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
            "--batch-size", "4", "--fit", "auto", "--save-every", "1", "--quiet"]
    result = runner.invoke(app, [*args, "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert memory.fit(s, Setting("full"), shape, (plain1 + ckpt1) / 2, "cpu", 4).describe() != (
        "batch 2 × accumulation 2")  # what re-deciding would pick now
    result = runner.invoke(app, [*args, "--max-steps", "2", "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert "fit auto: resuming, so batch 2 × accumulation 2 as the run chose" in " ".join(result.output.split())
    assert "done: 2 steps (1 after resuming at step 1) in" in " ".join(result.output.split())  # timed: this one
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["batch_size"], cfg["grad_accum"], cfg["gradient_checkpointing"]) == (2, 2, False)
    assert cfg["run"]["steps"] == 2


def test_lora_vision_keeps_the_vision_towers_activations_and_adapters(base):
    """--lora-vision: the backward runs through DaViT, so its blocks keep activations as in full fine-tuning."""
    from florence_kit.model.memory import VISION_BLOCK_LORA, _stage_tokens, trainable

    shape = Shape(768, 20, 16)
    lora = estimate(base, Setting("lora", 1), shape)
    adapted = estimate(base, Setting("lora", 1, lora_vision=True), shape)
    blocks = sum(VISION_BLOCK_LORA * n * c * d for n, c, d in zip(
        _stage_tokens(base, 768), base.embed_dim, base.depths, strict=True))
    assert adapted.per_sample >= lora.per_sample + 4 * blocks  # 4 GB more at 768 px: the frozen tower kept none
    assert len(base.vision_lora_targets) == 4 * 2 * sum(base.depths)  # qkv, proj, fc1, fc2 per half-block
    extra = trainable(base, "lora", 16, lora_vision=True) - trainable(base, "lora", 16)
    assert extra == 16 * sum(i + o for i, o in base.vision_lora_targets) and adapted.grads - lora.grads == 4 * extra
    assert estimate(base, Setting("full", 1, lora_vision=True), shape) == estimate(base, Setting("full", 1), shape)
    result = runner.invoke(app, ["plan", "docvqa", "--model", "base", "--gpu", "t4", "--mode", "lora",
                                 "--lora-vision"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("lora+vision"))
    plain = runner.invoke(app, ["plan", "docvqa", "--model", "base", "--gpu", "t4", "--mode", "lora"]).output
    lora_row = next(line for line in plain.splitlines() if line.startswith("lora "))
    assert int(row.split()[3]) < int(lora_row.split()[3])  # largest batch without checkpointing
    result = runner.invoke(app, ["plan", "docvqa", "--model", "base", "--gpu", "t4", "--mode", "full",
                                 "--lora-vision"])
    assert result.exit_code == 2 and "--lora-vision needs --mode lora or qlora" in result.output


def test_finetune_fit_auto_counts_lora_vision(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    """A budget between the lora+vision peaks at batch 1 and 2 (where plain lora fits 2) must pick batch 1."""
    import florence_kit.model.memory as memory

    s = memory.sizes(load_config(str(tiny_dir)))
    shape = Shape(128, 5, 5)
    one, two = (estimate(s, Setting("lora", b, lora_vision=True), shape).peak for b in (1, 2))
    assert estimate(s, Setting("lora", 2), shape).peak < (one + two) / 2  # without the tower, batch 2 would fit
    monkeypatch.setattr(memory, "local_budget", lambda precision=None: Budget("test", (one + two) / 2, "cpu", "fp32"))
    monkeypatch.setattr(memory, "text_lengths", lambda processor, rows: (5, 5))
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "4", "--fit", "auto",
                                 "--mode", "lora", "--lora-vision", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "effective batch 4 = batch 1 × accumulation 4" in " ".join(result.output.split())


def test_finetune_with_gradient_checkpointing_trains(tiny_dir, docvqa_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                                 "--gradient-checkpointing", "--quiet"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["gradient_checkpointing"] is True


def test_qlora_on_cpu_peaks_at_the_load_when_the_checkpoint_outweighs_training(base):
    """qlora on CPU: loading holds the mapped fp32 checkpoint + the 4-bit weights + the unquantised copies."""
    from florence_kit.model.memory import QUANT_BYTES

    shape = Shape(768, 20, 16)
    est = estimate(base, Setting("qlora", batch=1), shape, "cpu")
    assert est.load == pytest.approx(4 * base.total + QUANT_BYTES * base.linear + 4 * (base.total - base.linear))
    assert est.peak == est.load > 4 * base.total  # base, batch 1: the load (measured 1.25 GB, the run's peak)
    assert estimate(base, Setting("qlora", batch=2), shape, "cpu").peak > 1.5 * est.load  # batch 2: training
    large = sizes(load_config("large"))
    big = estimate(large, Setting("qlora", batch=1), shape, "cpu")
    assert big.peak == big.load > 4 * large.total  # large, batch 1: the load (measured 3.80 GB)
    assert estimate(large, Setting("qlora", batch=1), shape, "cuda").load == 0  # the file is host memory
    assert estimate(base, Setting("lora", batch=1), shape, "cpu").load == 0  # the mapped weights are the model's
    config = load_config("large")
    config.dtype = torch.bfloat16  # a bf16 checkpoint: half the file to map
    half = sizes(config)
    assert half.stored == 2 and estimate(half, Setting("qlora"), shape, "cpu").load < big.load


def _checked_in_rows(mode_filter: object) -> list[dict]:
    rows = []
    for name in ("memory_base_cpu.jsonl", "memory_tiny_cpu.jsonl", "memory_large_cpu.jsonl"):
        rows += [json.loads(line) for line in (ROOT / "benchmarks" / name).read_text().splitlines()]
    return [r for r in rows if mode_filter(r["mode"])]


def test_checked_in_measurements_are_within_15_percent():
    """The CPU measurements checked into benchmarks/ against the current model (re-measure when it changes)."""
    from benchmarks.memory import predict

    rows = _checked_in_rows(lambda mode: True)
    assert {r["model"] for r in rows} == {"base", "tiny", "large"} and {"full", "frozen-encoder", "lora", "qlora"} <= {
        r["mode"] for r in rows}
    assert {r["model"] for r in rows if r.get("lora_vision")} == {"base", "tiny"}  # --lora-vision measured too
    for row in rows:
        ratio = row["measured"] / predict(row)
        assert 0.85 <= ratio <= 1.15, (row, ratio)



def test_checked_in_gpu_measurements_are_within_15_percent():
    """The H200 measurements (bf16, torch's allocator + the CUDA context) against the model's CUDA terms.

    Rows carrying a ``note`` were measured under a setting users do not run (see the note) and are not compared.
    """
    from benchmarks.memory import predict

    rows = [json.loads(line) for line in (ROOT / "benchmarks" / "memory_base_cuda.jsonl").read_text().splitlines()]
    compared = [r for r in rows if not r.get("note")]
    assert len({r["mode"] for r in compared}) >= 3 and {r["batch"] for r in compared} >= {1, 8}
    for row in compared:
        assert row["device"] == "cuda" and row["precision"] == "bf16"
        ratio = row["measured"] / predict(row)
        assert 0.85 <= ratio <= 1.15, (row, ratio)
