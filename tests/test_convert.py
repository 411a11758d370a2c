"""``florence-kit convert``: Microsoft-format Florence-2 checkpoints and LoRA adapters give the reference's outputs.

The reference is Microsoft's remote code run under transformers 4.49 by tests/fixtures/ms_florence/make.py
(in an environment of its own); its outputs are recorded in golden.json / golden.safetensors beside a tiny
random Microsoft-format model and a LoRA adapter trained on it. These tests never need the old stack.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.model import convert as cv

FIXTURE = Path(__file__).parent / "fixtures" / "ms_florence"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())
# float32 logits of two implementations (the recorded reference, the native model here) of 7 layers, each summing
# in its own order: ~25 ulps of the largest logit (|35|, ulp 3.8e-6). Measured 3.0-3.8e-5 with AVX-512, AVX2, plain
# kernels alike (the implementations differ by more than the kernels do); a dropped or mis-mapped tensor: > 1e-2.
ATOL = 1e-4
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is ~15x faster on a shared CPU


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "golden.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "native"
    result = runner.invoke(app, ["convert", str(FIXTURE / "model"), str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted_adapter(tmp_path_factory: pytest.TempPathFactory, converted: Path) -> Path:
    out = tmp_path_factory.mktemp("convert") / "adapter"
    result = runner.invoke(app, ["convert", str(FIXTURE / "adapter"), str(out), "--base", str(converted)])
    assert result.exit_code == 0, result.output
    # the three roboflow/maestro targets that match nothing in Florence-2 are reported, not carried over
    assert "Conv2d, linear, o_proj" in result.output
    return out


def compare(model, processor, golden: dict, prefix: str, examples: list[dict], **gen) -> float:
    """Assert identical inputs, logits within ATOL and identical greedy / 3-beam answers; the worst |diff|."""
    worst = 0.0
    for i, rec in enumerate(examples):
        image = Image.open(FIXTURE / "images" / rec["image"]).convert("RGB")
        inputs = processor(images=image, text=rec["prompt"], return_tensors="pt")
        ids = inputs["input_ids"][0]
        n_image = int((ids == model.config.image_token_id).sum())
        assert n_image == GOLDEN["image_seq_length"]
        assert ids[n_image:].tolist() == golden[f"{prefix}input_ids.{i}"][0].tolist(), rec["prompt"]
        assert torch.equal(inputs["pixel_values"], golden[f"{prefix}pixel_values.{i}"])
        with torch.no_grad():
            logits = model(**inputs, decoder_input_ids=golden[f"{prefix}decoder_input_ids.{i}"]).logits
        ref = golden[f"{prefix}logits.{i}"]
        diff = (logits[..., : ref.shape[-1]] - ref).abs().max().item()
        assert diff < ATOL, (rec["prompt"], diff)
        worst = max(worst, diff)
        for beams, key in ((1, "greedy"), (3, "beam3")):
            out = model.generate(**inputs, max_new_tokens=GOLDEN["max_new_tokens"], num_beams=beams, do_sample=False,
                                 **gen)
            assert out[0].tolist() == rec[key], (rec["prompt"], key)
    return worst


def test_key_mapping_is_complete():
    """Every tensor of the Microsoft model maps to a native one, and every native tensor is filled."""
    state = cv.read_weights(FIXTURE / "model")
    weights, mapping = cv.convert_weights(state)
    assert set(mapping) | cv.DROPPED == set(state)  # nothing left unmapped (final_logits_bias: checked zero)
    config = cv.native_config(json.loads((FIXTURE / "model" / "config.json").read_text()), 1408, 1345,
                              tie_head=False, dtype=torch.float32)
    expected = cv.expected_native_keys(config)
    weights["model.language_model.shared.weight"] = cv._pad_rows(weights["model.language_model.shared.weight"], 1408)
    weights["lm_head.weight"] = cv._pad_rows(weights["lm_head.weight"], 1408)
    assert set(weights) == set(expected)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    # vision stages and blocks, projector, embeddings and an untied head are all among them
    for key in ("model.vision_tower.convs.1.norm.weight", "model.vision_tower.blocks.1.1.channel_block.ffn.fc2.bias",
                "model.multi_modal_projector.image_projection.weight", "lm_head.weight",
                "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"):
        assert key in weights
    assert torch.equal(weights["model.multi_modal_projector.image_projection.weight"], state["image_projection"].t())


def test_full_checkpoint_gives_the_reference_outputs(converted: Path, golden):
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model, info = Florence2ForConditionalGeneration.from_pretrained(converted, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    config = json.loads((converted / "config.json").read_text())
    assert "auto_map" not in config and config["tie_word_embeddings"] is False
    assert config["image_token_id"] == GOLDEN["vocab_size"] == 1345 and config["text_config"]["vocab_size"] == 1408
    assert model.dtype == torch.float32
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)  # the head is the saved one
    assert model.generation_config.forced_bos_token_id == 0  # from Microsoft's text_config, not its generation file
    processor = AutoProcessor.from_pretrained(converted)
    assert processor.tokenizer.convert_tokens_to_ids(["<od>", "<loc_0>", "<and>", "<image>"]) == [321, 325, 1344, 1345]
    worst = compare(model.eval(), processor, golden, "", GOLDEN["model"]["examples"])
    print(f"converted vs recorded logits: max |diff| {worst:.3g}")
    assert worst < ATOL


def test_adapter_gives_the_reference_outputs(converted: Path, converted_adapter: Path, golden, tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from florence_kit.model.loading import load_model

    cfg = json.loads((converted_adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(converted.resolve())
    assert "lm_head" in cfg["target_modules"] and not any(t in cfg["target_modules"] for t in ("o_proj", "Conv2d"))
    processor = AutoProcessor.from_pretrained(converted)
    examples = GOLDEN["adapter"]["examples"]
    base = Florence2ForConditionalGeneration.from_pretrained(converted).eval()
    compare(PeftModel.from_pretrained(base, str(converted_adapter)).eval(), processor, golden, "adapter.", examples)
    # what eval/predict/serve load: the base + adapter, merged
    model, processor = load_model(str(converted_adapter))
    compare(model.eval(), processor, golden, "adapter.", examples)
    # export --merge: a plain checkpoint. Its saved generation config is florence-kit's plain one (the task file
    # decides decoding), so Microsoft's decoding settings are passed here; forced_bos_token_id is kept
    merged = tmp_path / "merged"
    result = runner.invoke(app, ["export", str(converted_adapter), "--merge", str(merged)])
    assert result.exit_code == 0, result.output
    model = Florence2ForConditionalGeneration.from_pretrained(merged).eval()
    assert model.generation_config.forced_bos_token_id == 0
    compare(model, AutoProcessor.from_pretrained(merged), golden, "adapter.", examples,
            no_repeat_ngram_size=3, early_stopping=True, forced_eos_token_id=2)


def test_dtype_is_kept_unless_asked(tmp_path: Path):
    src = tmp_path / "fp16"
    shutil.copytree(FIXTURE / "model", src)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (src / "config.json").write_text(json.dumps(cfg))
    assert runner.invoke(app, ["convert", str(src), str(tmp_path / "a")]).exit_code == 0
    out = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert {v.dtype for v in out.values()} == {torch.float16}
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "b"), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert {v.dtype for v in load_file(str(tmp_path / "b" / "model.safetensors")).values()} == {torch.bfloat16}


def test_bin_weights_load_without_pickled_code(tmp_path: Path, converted: Path):
    src = tmp_path / "bin"
    shutil.copytree(FIXTURE / "model", src)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    assert runner.invoke(app, ["convert", str(src), str(tmp_path / "out")]).exit_code == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "pytorch_model.bin").exists()
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(converted / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_missing_is_tied_and_said(tmp_path: Path):
    src = tmp_path / "nohead"
    shutil.copytree(FIXTURE / "model", src)
    state = load_file(str(src / "model.safetensors"))
    del state["language_model.lm_head.weight"]
    save_file(state, str(src / "model.safetensors"))
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0 and "tied" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_output_folder_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    result = runner.invoke(app, ["convert", str(FIXTURE / "model"), str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "earlier work"

    def boom(*args, **kwargs):
        raise UserError("disk trouble halfway")

    monkeypatch.setattr(cv, "save_file", boom, raising=False)
    monkeypatch.setattr("safetensors.torch.save_file", boom)
    result = runner.invoke(app, ["convert", str(FIXTURE / "model"), str(out), "--overwrite"])
    assert result.exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # untouched: the new one was never complete
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    monkeypatch.undo()
    assert runner.invoke(app, ["convert", str(FIXTURE / "model"), str(out), "--overwrite"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def _copy(tmp_path: Path, what: str = "model") -> Path:
    dst = tmp_path / f"src-{what}"
    shutil.copytree(FIXTURE / what, dst)
    return dst


def _bad_inputs(tmp_path: Path, converted: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (convert arguments, a word the one-line error must contain)."""
    cases: dict[str, tuple[list[str], str]] = {}
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hi")
    cases["neither format"] = ([str(neither)], "neither")
    native = converted
    cases["already native"] = ([str(native)], "native")
    src = _copy(tmp_path, "model")
    (src / "model.safetensors").write_bytes(b"")
    cases["zero-byte weights"] = ([str(src)], "empty")
    src = _copy(tmp_path / "t", "model")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated weights"] = ([str(src)], "truncated")
    src = _copy(tmp_path / "p", "model")
    (src / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, src / "pytorch_model.bin")
    cases["bin with objects"] = ([str(src)], "more than tensors")
    src = _copy(tmp_path / "k", "model")
    (src / "tokenizer.json").unlink()
    (src / "vocab.json").unlink()
    cases["no tokenizer"] = ([str(src)], "tokenizer")
    src = _copy(tmp_path / "b", "model")
    state = load_file(str(src / "model.safetensors"))
    state["language_model.final_logits_bias"] += 0.5
    save_file(state, str(src / "model.safetensors"))
    cases["nonzero final_logits_bias"] = ([str(src)], "final_logits_bias")
    src = _copy(tmp_path / "r", "adapter")
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=0) if "lora_A" in k else v for k, v in state.items()},
              str(src / "adapter_model.safetensors"))
    cases["adapter rank does not fit"] = ([str(src), "--base", str(converted)], "does not fit")
    cases["adapter on a Microsoft base"] = ([str(FIXTURE / "adapter"), "--base", str(FIXTURE / "model")],
                                            "florence-kit convert")
    return cases


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, converted: Path):
    for name, (args, word) in _bad_inputs(tmp_path, converted).items():
        out = tmp_path / "out" / name.replace(" ", "-")
        result = runner.invoke(app, ["convert", *args, str(out)])
        assert result.exit_code == 2, (name, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, result.output)
        assert word in " ".join(result.output.split()), (name, result.output)
        assert not out.exists(), name


def test_microsoft_folder_given_as_model_names_the_convert_command():
    from florence_kit.model.loading import load_model

    with pytest.raises(UserError) as exc:
        load_model(str(FIXTURE / "model"))
    assert f"florence-kit convert {FIXTURE / 'model'}" in str(exc.value)
    with pytest.raises(UserError) as exc:
        load_model(str(FIXTURE / "adapter"))
    assert "florence-kit convert" in str(exc.value) and "--base" in str(exc.value)


@pytest.mark.slow
def test_converted_model_trains_and_is_scored(converted: Path, docvqa_dir: Path, tmp_path: Path):
    """`finetune --model CONVERTED` continues training (full and lora) and `eval` scores the result."""
    run = tmp_path / "run"
    for mode, out in (("full", run), ("lora", tmp_path / "lora")):
        result = runner.invoke(app, ["finetune", "docvqa", "--model", str(converted), "--dataset", str(docvqa_dir),
                                     "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2", "--quiet",
                                     "--mode", mode])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(run), "--dataset", str(docvqa_dir),
                                 "--max-samples", "2", "--output-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0 and "anls" in result.output, result.output
