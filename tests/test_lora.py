"""LoRA / QLoRA / 8-bit AdamW: what is wrapped, what trains, what is saved, and that export merges exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from support import wrapped_modules
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.data.dataset import TaskDataset, load_split
from florence_kit.model import adapters, loading
from florence_kit.model.adapters import load_adapter_model, wrap_lora
from florence_kit.model.loading import load_model
from florence_kit.model.modes import apply_mode, component, trainable_counts, unwrap
from florence_kit.train.config import TrainConfig
from florence_kit.train.loop import train_loop
from florence_kit.train.runfolder import RunFolder
from florence_kit.train.step import make_optimizer

runner = CliRunner()
R = 4  # a small rank keeps the arithmetic readable


def _linear_sizes(model, prefix: str) -> dict[str, tuple[int, int]]:
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}


def _native_name(peft_param_name: str) -> str:
    """PEFT's name for a base weight → the native model's name for it."""
    return peft_param_name.replace(".base_layer", "").replace(".original_module", "")


def _batch(processor, n: int = 2):
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        image = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(image).text((10, 10 + 30 * i), f"Total {100 + i}", fill="black")
        images.append(image)
    batch = processor(images=images, text=["<DocVQA>What is the total?"] * n, return_tensors="pt")
    batch["decoder_input_ids"] = processor.tokenizer(["</s><s>12"] * n, return_tensors="pt").input_ids
    return batch


def test_default_targets_wrap_exactly_the_language_layers(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    text = model.config.text_config
    peft_model = wrap_lora(model, R, 8, 0.0, lora_vision=False)
    wrapped = wrapped_modules(peft_model)
    # self q/k/v/out + fc1/fc2 per encoder layer; self + cross q/k/v/out + fc1/fc2 per decoder layer
    assert len(wrapped) == 6 * text.encoder_layers + 10 * text.decoder_layers == 32
    assert all(".language_model." in n for n in wrapped)
    assert not any("vision_tower" in n or "projector" in n or "lm_head" in n for n in wrapped)


def test_lora_vision_also_wraps_the_davit_attention_and_mlp(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    blocks = sum(model.config.vision_config.depths)
    wrapped = wrapped_modules(wrap_lora(model, R, 8, 0.0, lora_vision=True))
    vision = [n for n in wrapped if ".vision_tower." in n]
    assert len(vision) == blocks * 2 * 4  # (spatial + channel block) x (qkv, proj, fc1, fc2)
    assert len(wrapped) - len(vision) == 32
    assert not any(".convs." in n or "conv1" in n or "conv2" in n for n in vision)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_base_shaped_model_wraps_96_language_modules_and_none_of_the_48_vision_mlps():
    """Florence-2-base's layout (DaViT depths 1-1-9-1, 6+6 BART layers) at toy widths."""
    from peft import LoraConfig, get_peft_model
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.tiny import tiny_config

    config = tiny_config(
        vision_depths=(1, 1, 9, 1), vision_patch_size=(7, 3, 3, 3), vision_patch_stride=(4, 2, 2, 2),
        vision_patch_padding=(3, 1, 1, 1), vision_patch_prenorm=(False, True, True, True),
        vision_embed_dim=(32,) * 4, vision_num_heads=(1,) * 4, vision_num_groups=(1,) * 4,
        encoder_layers=6, decoder_layers=6, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=1, decoder_attention_heads=1, vocab_size=64, max_position_embeddings=64,
    )
    ours = wrapped_modules(wrap_lora(Florence2ForConditionalGeneration(config), 2, 4, 0.0, lora_vision=False))
    assert len(ours) == 6 * 6 + 10 * 6 == 96 and not any("vision_tower" in n for n in ours)
    with_vision = wrapped_modules(wrap_lora(Florence2ForConditionalGeneration(config), 2, 4, 0.0, lora_vision=True))
    assert len(with_vision) == 96 + 12 * 2 * 4  # 12 DaViT blocks x (spatial, channel) x (qkv, proj, fc1, fc2)
    # the pitfall the anchored regex avoids: PEFT matches a plain name list by suffix
    names = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    naive = wrapped_modules(get_peft_model(Florence2ForConditionalGeneration(config), LoraConfig(target_modules=names)))
    assert sum("vision_tower" in n for n in naive) == 48


def _expected(model, mode: str) -> dict[str, tuple[int, int]]:
    """(trainable, total) per part computed from the native model's Linear shapes, independently of PEFT."""
    native = {name: sum(p.numel() for p in component(model, name).parameters())
              for name in ("vision", "projector", "language")}
    if mode == "full":
        return {k: (n, n) for k, n in native.items()}
    if mode == "frozen-encoder":
        return {"vision": (0, native["vision"]), "projector": (native["projector"],) * 2,
                "language": (native["language"],) * 2}
    lang = sum(R * (i + o) for n, (i, o) in _linear_sizes(model, "model.language_model").items()
               if ".layers." in n)
    vis = sum(R * (i + o) for n, (i, o) in _linear_sizes(model, "model.vision_tower").items()
              if ".blocks." in n) if mode == "lora+vision" else 0
    return {"vision": (vis, native["vision"] + vis),
            "projector": (native["projector"], 2 * native["projector"]),  # trained copy + frozen original
            "language": (lang, native["language"] + lang)}


@pytest.mark.parametrize("mode", ["full", "frozen-encoder", "lora", "lora+vision"])
def test_parameter_summary_matches_each_mode(tiny_dir, mode):
    model, _ = load_model(str(tiny_dir))
    expected = _expected(model, mode)
    name, vision = mode.removesuffix("+vision"), mode.endswith("+vision")
    if name == "lora":
        model = wrap_lora(model, R, 8, 0.0, lora_vision=vision)
    apply_mode(model, name, vision)
    assert trainable_counts(model) == expected
    if name == "lora":  # nothing but adapters and the projector copy trains
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)
        assert not unwrap(model).lm_head.weight.requires_grad


def test_lora_training_leaves_base_weights_bit_identical(tiny_dir, docvqa_dir, docvqa_task, tmp_path):
    model, processor = load_model(str(tiny_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = wrap_lora(model, R, 8, 0.0, lora_vision=False)
    calls = []
    component(model, "vision").register_forward_hook(
        lambda mod, inp, out: calls.append((torch.is_grad_enabled(), mod.training)))
    dataset = TaskDataset(load_split(docvqa_task, str(docvqa_dir), "train"), docvqa_task, with_target=True)
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=tmp_path, mode="lora", max_steps=2,
                      batch_size=4, lr=1e-2, log_every=1)
    steps, loss = train_loop(model, processor, dataset, cfg, RunFolder(tmp_path))
    assert steps == 2 and loss == loss
    base = {_native_name(n): p for n, p in unwrap(model).named_parameters()
            if "lora_" not in n and "modules_to_save" not in n}
    assert base.keys() == before.keys()
    assert [n for n in before if not torch.equal(before[n], base[n].detach())] == []
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 32 and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at 0: it trained
    copy = dict(component(model, "projector").modules_to_save["default"].named_parameters())
    assert any(not torch.equal(before[f"model.multi_modal_projector.{n}"], p) for n, p in copy.items())
    assert calls and all(c == (False, False) for c in calls)  # frozen vision: no_grad, eval mode


@pytest.fixture(scope="module")
def lora_run(tiny_dir: Path, docvqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    result = runner.invoke(app, [
        "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
        "--mode", "lora", "--lora-r", str(R), "--lora-alpha", "8", "--max-steps", "2", "--batch-size", "4",
        "--lr", "1e-2", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "trainable parameters:" in result.output and "vision 0/" in result.output
    return out


def test_lora_run_folder_holds_the_adapter_and_processor(lora_run: Path, tiny_dir: Path):
    for name in ("adapter_model.safetensors", "adapter_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json", "config.yaml", "metrics.jsonl"):
        assert (lora_run / name).is_file(), name
    assert not (lora_run / "model.safetensors").exists()  # the adapter, not a copy of the base
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir.resolve())
    assert config["r"] == R and config["modules_to_save"] == ["multi_modal_projector"]


def test_eval_loads_a_lora_run_folder(lora_run: Path, docvqa_dir: Path, tmp_path: Path):
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(lora_run), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path), "--max-samples", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 4


def test_export_merge_matches_the_adapter_model(lora_run: Path, tiny_dir: Path, tmp_path: Path):
    from transformers import Florence2ForConditionalGeneration

    out = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(lora_run), "--merge", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    merged = Florence2ForConditionalGeneration.from_pretrained(str(out)).eval()
    adapter_model, processor = load_adapter_model(lora_run, merge=False)
    base, _ = load_model(str(tiny_dir))
    batch = _batch(processor)
    with torch.no_grad():
        want = adapter_model.eval()(**batch).logits
        got = merged(**batch).logits
        untouched = base.eval()(**batch).logits
    assert (want - untouched).abs().max() > 1e-3  # the adapter changes the outputs...
    print(f"merged vs adapter logits: max |diff| {float((got - want).abs().max()):.3g}, "
          f"max |logit| {float(want.abs().max()):.3g}")
    # ...and the merged model reproduces them: x(W + s*BA) against xW + s*(xA)B rounds each product in another
    # order, a few float32 ulps of logits below ~5 (~1e-6); a merge that dropped or doubled s*BA moves them >1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    again = runner.invoke(app, ["export", str(lora_run), "--merge", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_a_lora_run_whose_base_is_gone_exits_2_naming_it(lora_run: Path, docvqa_dir: Path, tmp_path: Path):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(lora_run, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(moved), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 2 and "deleted-base" in result.output and "base model" in result.output


def test_qlora_on_top_of_a_lora_run_asks_for_an_export_first(lora_run: Path, docvqa_dir: Path, tmp_path: Path):
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(lora_run), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "q"), "--mode", "qlora", "--max-steps", "1"])
    assert result.exit_code == 2 and "--merge OUT" in result.output and not (tmp_path / "q").exists()


def test_export_refuses_a_plain_checkpoint(tiny_dir: Path, tmp_path: Path):
    result = runner.invoke(app, ["export", str(tiny_dir), "--merge", str(tmp_path / "m")])
    assert result.exit_code == 2 and "nothing to merge" in result.output


def test_adamw8bit_steps_with_8bit_state(tiny_dir):
    model, processor = load_model(str(tiny_dir))
    apply_mode(model, "full")
    optimizer = make_optimizer(model, 1e-3, 0.0, "adamw8bit")
    assert "8bit" in type(optimizer).__name__
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(processor)
    batch["labels"] = batch.pop("decoder_input_ids")
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any("language_model" in n for n in changed) and any("vision_tower" in n for n in changed)
    big = model.model.language_model.encoder.layers[0].fc1.weight  # >= 4096 values: bnb keeps 8-bit state
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[big]["state2"].dtype == torch.uint8


# the one refusal that means "this hardware has no 4-bit kernels" (florence_kit.model.loading.load_quantized); a
# missing bitsandbytes or any other exit 2 is a failure here, not a skip
NO_4BIT = "cannot load the model in 4-bit NF4 for --mode qlora"


def test_qlora_trains_on_cpu_with_a_4bit_base(tiny_dir, docvqa_dir, tmp_path):
    """bitsandbytes >= 0.50 runs NF4 on x86-64 CPUs; where it cannot, finetune must exit 2 with a message."""
    out = tmp_path / "q"
    result = runner.invoke(app, [
        "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
        "--mode", "qlora", "--lora-r", str(R), "--max-steps", "1", "--batch-size", "2", "--quiet",
    ])
    if result.exit_code == 2 and NO_4BIT in result.output:  # the hardware cannot (bitsandbytes is installed)
        assert "use --mode lora instead" in result.output and not out.exists()
        pytest.skip(f"4-bit not available here: {result.output.strip()}")
    assert result.exit_code == 0, result.output
    assert "optimizer: adamw8bit" in result.output or "optimizer: paged-adamw8bit" in result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"] in ("adamw8bit", "paged-adamw8bit")
    # same trainable parameters as lora (adapters + projector), totals counted at their logical (unpacked) size
    model, _ = load_model(str(tiny_dir))
    expected = _expected(model, "lora")
    text = " ".join(result.output.split())  # rich wraps long lines at the terminal width
    assert f"language {expected['language'][0]:,}/{expected['language'][1]:,}" in text
    assert f"vision 0/{expected['vision'][1]:,}" in text
    assert f"projector {expected['projector'][0]:,}/{expected['projector'][1]:,}" in text
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
    # export merges the adapter into the base loaded in full precision: a plain, unquantised checkpoint
    merged = runner.invoke(app, ["export", str(out), "--merge", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


def test_qlora_without_bitsandbytes_exits_2_naming_the_fix(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, "has_bitsandbytes", lambda: False)
    out = tmp_path / "q"
    for args in (["--mode", "qlora"], ["--mode", "lora", "--optim", "adamw8bit"]):
        result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                     "--output-dir", str(out), "--max-steps", "1", *args])
        assert result.exit_code == 2, result.output
        assert "florence-kit[quant]" in result.output and not out.exists()
    assert "--mode lora" in result.output or "--optim adamw" in result.output


@pytest.mark.parametrize("where", ["load", "first matmul"])
def test_qlora_on_hardware_without_4bit_exits_2_naming_lora(tiny_dir, docvqa_dir, tmp_path, monkeypatch, where):
    def fail(*args, **kwargs):
        raise RuntimeError("4-bit kernels are not available on this CPU")

    if where == "load":
        monkeypatch.setattr(loading, "load_native", fail)  # the 4-bit load of the base
    else:
        monkeypatch.setattr(adapters, "_try_4bit_forward", fail)
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "q"), "--mode", "qlora", "--max-steps", "1"])
    assert result.exit_code == 2 and "use --mode lora" in result.output and "4-bit" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--lora-vision"], "--lora-vision needs --mode lora"),
    (["--mode", "lora", "--lora-r", "0"], "--lora-r must be at least 1"),
    (["--mode", "lora", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
])
def test_bad_lora_options_exit_2_before_writing(tiny_dir, docvqa_dir, tmp_path, args, message):
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "x"), "--max-steps", "1", *args])
    assert result.exit_code == 2 and message in result.output and not (tmp_path / "x").exists()


def _tensors_in_file_mapping(model, path: Path) -> list[str]:
    """Names of the model's tensors whose memory lies inside a mapping of ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if any(start <= t.data_ptr() < end for start, end in ranges)]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mappings (Linux)")
def test_4bit_load_keeps_no_tensor_in_the_mapped_checkpoint(tiny_dir, monkeypatch):
    """A 4-bit load on CPU must not keep the checkpoint mapped: that kept every fp32 original resident."""
    from florence_kit.common.errors import UserError

    checkpoint = (tiny_dir / "model.safetensors").resolve()
    monkeypatch.setattr(adapters, "own_unquantized_weights", lambda model: None)
    try:
        mapped, _ = loading.load_quantized(str(tiny_dir))
    except UserError as exc:
        if NO_4BIT not in str(exc):
            raise
        pytest.skip(f"4-bit not available here: {exc}")
    # without the copy, the unquantised tensors are views into the mapped file (what this guards against)
    assert "model.vision_tower.convs.0.conv.weight" in _tensors_in_file_mapping(mapped, checkpoint)
    monkeypatch.undo()
    model, _ = loading.load_quantized(str(tiny_dir))
    assert _tensors_in_file_mapping(model, checkpoint) == []
    # same values, the LM head still tied to the token embeddings, the 4-bit layers untouched
    for name, param in mapped.named_parameters():
        if type(param).__name__ != "Params4bit":
            assert torch.equal(param, model.get_parameter(name)), name
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())


@pytest.mark.parametrize(
    ("cuda", "bf16", "dtype"),
    [(False, False, torch.float32), (True, False, torch.float16), (True, True, torch.bfloat16)],
    ids=["cpu", "t4", "a100"],
)
def test_4bit_layers_compute_in_the_runs_precision(monkeypatch, cuda, bf16, dtype):
    """bf16 where the GPU has it natively, fp16 on a T4 (whose is_bf16_supported() says True: emulation)."""
    import florence_kit.model.precision as precision

    monkeypatch.setattr(precision, "device_facts", lambda: precision.DeviceFacts(cuda=cuda, bf16=bf16))
    assert adapters.quantization_config().bnb_4bit_compute_dtype == dtype


@pytest.mark.parametrize(("mode", "args", "expected"), [
    ("lora", [], 1e-4),  # LoRA's low-rank updates need ~10x full fine-tuning's rate
    ("full", [], 1e-5),
    ("lora", ["--lr", "3e-4"], 3e-4),  # an explicit rate wins
])
def test_default_learning_rate_follows_the_mode(tiny_dir, docvqa_dir, tmp_path, mode, args, expected):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
        "--mode", mode, "--max-steps", "1", "--batch-size", "2", "--max-samples", "2", "--schedule", "constant",
        "--quiet", *args,
    ])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == expected  # recorded: --config repeats it
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(expected)  # the rate the optimizer ran at
    assert ("learning rate: 0.0001 (the lora default" in result.output) == (mode == "lora" and not args)


def test_the_same_seed_gives_the_same_lora_run(tiny_dir, docvqa_dir, tmp_path):
    """LoRA's A matrices start random: they must come from --seed, not from whatever the process drew before."""
    from safetensors.torch import load_file

    from florence_kit.train.recipe import finetune

    adapters_of = []
    for i, noise in enumerate((1, 2)):  # the global RNG in another state, as in a fresh process or a resume
        torch.manual_seed(noise)
        cfg = TrainConfig(task="docvqa", model=str(tiny_dir), dataset=str(docvqa_dir), output_dir=tmp_path / str(i),
                          mode="lora", lora_r=R, max_steps=1, batch_size=2, max_samples=4, seed=7)
        finetune(cfg, quiet=True, print_fn=lambda _: None)
        adapters_of.append(load_file(str(tmp_path / str(i) / "adapter_model.safetensors")))
    first, second = adapters_of
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


@pytest.mark.parametrize("damage", ["no adapter weights", "adapter weights cut short"])
def test_a_partially_written_lora_run_exits_2(lora_run: Path, docvqa_dir: Path, tmp_path: Path, damage: str):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(lora_run, moved)
    weights = moved / "adapter_model.safetensors"
    if damage == "no adapter weights":
        weights.unlink()
    else:
        with weights.open("r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(moved), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(tmp_path / "e"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "adapter" in result.output and "Traceback" not in result.output
