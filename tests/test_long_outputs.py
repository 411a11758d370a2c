"""Answers past 1,024 tokens: grown position tables, `finetune --max-target-length`, every consumer of such a model.

The tiny model (1,024 positions, byte-level tokenizer: one token per character) is grown to 2,048 and trained on
synthetic pages of 1,100-1,400 target tokens. Checkpoints that must generate a fixed length have end-of-answer
and white space suppressed in their saved generation config (florence-kit's decoding reads ``suppress_tokens`` from
it), so each answer is ``max_new_tokens`` characters or more whatever the weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.model.positions import grow_for_training, grow_positions, position_tables

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
LONG = 2048
OLD = 1024
OFFSET = 2  # BART's learned tables keep two rows no position reads


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from florence_kit.demo.synthetic_pages import page_splits

    out = tmp_path_factory.mktemp("pages") / "data"
    page_splits(6, 2, target_tokens=(1100, 1400), side=128).save_to_disk(str(out))
    return out


@pytest.fixture(scope="module")
def trained(tiny_dir: Path, pages_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``finetune ocr-page --max-target-length 2048`` on pages longer than 1,024 tokens; (run folder, its output)."""
    out = tmp_path_factory.mktemp("long") / "run"
    result = runner.invoke(app, ["finetune", "ocr-page", "--model", str(tiny_dir), "--dataset", str(pages_dir),
                                 "--output-dir", str(out), "--max-target-length", str(LONG), "--max-steps", "24",
                                 "--batch-size", "2", "--lr", "2e-3", "--fit", "auto", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def endless(trained: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run with end-of-answer and white space suppressed: every answer is max_new_tokens characters."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("endless") / "model"
    shutil.copytree(trained[0], out)
    blank = AutoTokenizer.from_pretrained(out)(" \n", add_special_tokens=False)["input_ids"]
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "suppress_tokens": [2, *blank]}))
    return out


def tail_loss(model, processor, image, text: str) -> tuple[float, float]:
    """Mean token loss (teacher forced) over target positions < 1,024 and >= 1,024."""
    inputs = processor(images=[image], text=["<OCR>"], return_tensors="pt")
    labels = processor.tokenizer([text], return_tensors="pt")["input_ids"]
    assert labels.shape[1] > OLD + 50
    with torch.no_grad():
        logits = model(**inputs, labels=labels).logits
    losses = torch.nn.functional.cross_entropy(logits[0].float(), labels[0], reduction="none")
    return float(losses[:OLD].mean()), float(losses[OLD:].mean())


def test_copy_keeps_every_old_position_and_the_outputs() -> None:
    from PIL import Image

    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny()
    before = {name: table.weight.detach().clone() for name, table in position_tables(model).items()}
    inputs = processor(images=[Image.new("RGB", (128, 128), "white")], text=["<OCR>"], return_tensors="pt")
    labels = processor.tokenizer(["a short answer"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(**inputs, labels=labels).logits
    assert grow_positions(model, LONG, "copy", processor)
    for name, table in position_tables(model).items():
        assert table.weight.shape == (LONG + OFFSET, before[name].shape[1]) and table.num_embeddings == LONG + OFFSET
        assert torch.equal(table.weight[:OLD + OFFSET], before[name])  # the old rows, untouched
        assert torch.equal(table.weight[OFFSET + OLD + 5], before[name][OFFSET + 5])  # position 1029 starts as 5
    assert model.config.text_config.max_position_embeddings == LONG and processor.tokenizer.model_max_length >= LONG
    with torch.no_grad():
        assert torch.equal(model(**inputs, labels=labels).logits, expected)
    assert not grow_positions(model, OLD, "copy")  # never shrinks; already long enough is a no-op


def test_interpolation_stretches_the_decoder_and_tiles_the_encoder() -> None:
    from florence_kit.model.tiny import make_tiny

    model, _ = make_tiny()
    before = {name: table.weight.detach().clone() for name, table in position_tables(model).items()}
    grow_positions(model, LONG, "interpolate")
    tables = position_tables(model)
    dec, old_dec = tables["decoder"].weight, before["decoder"]
    assert torch.equal(dec[:OFFSET], old_dec[:OFFSET])
    assert torch.allclose(dec[OFFSET], old_dec[OFFSET]) and torch.allclose(dec[-1], old_dec[-1], atol=1e-6)
    # position p sits at p * 1023 / 2047 of the old table: 1023 between old 511 and 512
    mid = old_dec[OFFSET + 511] + (1023 * 1023 / 2047 - 511) * (old_dec[OFFSET + 512] - old_dec[OFFSET + 511])
    assert torch.allclose(dec[OFFSET + 1023], mid, atol=1e-5)
    assert not torch.equal(dec[OFFSET + 100], old_dec[OFFSET + 100])  # the old positions moved
    assert torch.equal(tables["encoder"].weight[:OLD + OFFSET], before["encoder"])  # what the encoder reads: kept


def test_bad_lengths_inits_and_adapter_modes_are_one_line() -> None:
    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny()
    with pytest.raises(UserError, match="copy, interpolate"):
        grow_positions(model, LONG, "nearest")
    with pytest.raises(UserError, match="between 1 and"):
        grow_positions(model, 0)
    with pytest.raises(UserError, match="adapter"):
        grow_for_training(model, processor, LONG, "lora")
    with pytest.raises(UserError, match="between 1 and"):
        grow_for_training(model, processor, 0, "full")
    assert model.config.text_config.max_position_embeddings == OLD  # nothing changed by the refusals
    assert "needs no growing" in grow_for_training(model, processor, 512, "lora")
    assert grow_for_training(model, processor, None, "full") is None


def test_grown_checkpoint_reloads_with_from_pretrained_alone(tmp_path: Path) -> None:
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny()
    grow_positions(model, LONG, "interpolate", processor)
    model.save_pretrained(tmp_path)
    again, info = Florence2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert again.config.text_config.max_position_embeddings == LONG
    for name, table in position_tables(again).items():
        assert torch.equal(table.weight, position_tables(model)[name].weight)


def test_finetune_keeps_the_long_pages_and_learns_the_tail(tiny_dir: Path, pages_dir: Path, trained, tmp_path: Path):
    import datasets

    from florence_kit.model.loading import load_model

    stock = runner.invoke(app, ["finetune", "ocr-page", "--model", str(tiny_dir), "--dataset", str(pages_dir),
                                "--output-dir", str(tmp_path / "stock"), "--max-steps", "1", "--quiet"])
    assert stock.exit_code == 2 and "6 of 6 examples exceed 1024 positions" in stock.output
    run, output = trained
    assert "grown from 1024 to 2048" in output and "0 of 6 examples exceed 2048 positions" in output
    assert json.loads((run / "config.json").read_text())["text_config"]["max_position_embeddings"] == LONG
    fitted = re.search(r"fit auto \(.*?(\d+)\+(\d+) text tokens", " ".join(output.split()))
    assert fitted and int(fitted.group(2)) > OLD  # --fit auto sized the batch for the long targets it keeps
    page = datasets.load_from_disk(str(pages_dir))["train"][0]
    start, processor = load_model(str(tiny_dir))
    grow_positions(start, LONG, "copy", processor)  # what the run started from
    done, _ = load_model(str(run))
    head0, tail0 = tail_loss(start, processor, page["image"], page["text"])
    head1, tail1 = tail_loss(done, processor, page["image"], page["text"])
    print(f"loss before/after: head {head0:.3f} -> {head1:.3f}, tail (>= 1024) {tail0:.3f} -> {tail1:.3f}")
    # measured 7.6 -> 3.1 on both sides; a tail the loss never reached (masked, truncated) would stay at ~7.6
    assert tail1 < 0.6 * tail0 and tail1 < head1 + 0.5


def test_eval_predict_and_serve_answer_past_1024_tokens(endless: Path, pages_dir: Path, tmp_path: Path) -> None:
    import datasets

    from florence_kit.evaluate.generation import generation_config, position_limit
    from florence_kit.model.loading import load_model
    from florence_kit.present.serve import Predictor
    from florence_kit.tasks.registry import all_tasks

    image = datasets.load_from_disk(str(pages_dir))["validation"][0]["image"]
    page = tmp_path / "page.png"
    image.save(page)
    result = runner.invoke(app, ["predict", str(page), "--task", "ocr-page", "--model", str(endless),
                                 "--max-new-tokens", "1400", "--output", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    answer = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])["answer"]
    assert len(answer) >= 1400, len(answer)  # one character (or a <loc_*>) per token
    result = runner.invoke(app, ["eval", "ocr-page", "--model", str(endless), "--dataset", str(pages_dir),
                                 "--output-dir", str(tmp_path / "eval"), "--max-samples", "1",
                                 "--max-new-tokens", "1400", "--quiet"])
    assert result.exit_code == 0, result.output
    prediction = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert len(prediction["prediction"]) >= 1400
    model, processor = load_model(str(endless))
    assert position_limit(model) == LONG
    assert generation_config(model, processor, {"max_new_tokens": 4096}).max_new_tokens == LONG
    served = Predictor(model, processor, dict(all_tasks()))(image, "ocr-page", "")
    assert len(served.text) >= LONG  # the task asks 4,096: capped at the grown table's 2,048


def test_convert_keeps_a_longer_microsoft_table(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "ms4k"
    shutil.copytree(Path(__file__).parent / "fixtures" / "ms_florence" / "model", src)
    config = json.loads((src / "config.json").read_text())
    old = config["text_config"]["max_position_embeddings"]
    config["text_config"]["max_position_embeddings"] = 4096
    (src / "config.json").write_text(json.dumps(config))
    state = load_file(str(src / "model.safetensors"))
    grown = {}
    for part in ("encoder", "decoder"):
        key = f"language_model.model.{part}.embed_positions.weight"
        assert state[key].shape[0] == old + OFFSET
        grown[part] = torch.randn(4096 + OFFSET, state[key].shape[1], generator=torch.Generator().manual_seed(1))
        state[key] = grown[part]
    save_file(state, str(src / "model.safetensors"))
    result = runner.invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["max_position_embeddings"] == 4096
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for part, rows in grown.items():
        assert torch.equal(out[f"model.language_model.{part}.embed_positions.weight"], rows)


@pytest.mark.slow
def test_onnx_export_and_transformersjs_answer_as_pytorch_past_1024(endless: Path, tmp_path: Path) -> None:
    """~50 s: one fp32 export; the graphs take positions past 1,024 and give PyTorch's text."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")
    from florence_kit.demo.synthetic_pages import page_text, render_page
    from florence_kit.evaluate.generation import generate, generation_config
    from florence_kit.model.loading import load_model
    from florence_kit.model.onnx_runtime import load_onnx_model
    from florence_kit.present.onnx_export import export_onnx

    export = tmp_path / "onnx"
    export_onnx(str(endless), export, print_fn=lambda *_: None)
    torch_model, processor = load_model(str(endless))
    onnx_model, _ = load_onnx_model(export, "fp32")
    import random

    image = render_page(page_text(random.Random(5), 1200), side=128)  # 128 px: the resize is the identity
    gen = generation_config(torch_model, processor, {"max_new_tokens": 1300})
    expected = generate(torch_model, processor, [image], ["<OCR>"], gen)
    assert len(expected[0]) >= 1300
    assert generate(onnx_model, processor, [image], ["<OCR>"], gen) == expected
    from test_onnx_export import js_answer, run_transformersjs, transformersjs_dir

    module_dir = transformersjs_dir()  # skips where Node/npm/the package are missing
    page = tmp_path / "page.png"
    image.save(page)
    js = run_transformersjs(module_dir, export, page, "<OCR>", 1300)
    assert len(js["ids"]) == 1301  # the start token + 1,300 generated
    assert js_answer(js["text"]) == expected[0]


def test_plan_counts_the_longer_targets_and_the_grown_tables() -> None:
    from florence_kit.model.memory import Shape, activations, load_config, sizes, with_positions

    long = runner.invoke(app, ["plan", "ocr-page", "--model", "base", "--gpu", "t4"])
    short = runner.invoke(app, ["plan", "ocr-page", "--model", "base", "--gpu", "t4", "--target-tokens", "1024"])
    assert long.exit_code == 0 and short.exit_code == 0, long.output + short.output
    assert "4096 target tokens" in long.output and "236 M parameters" in long.output  # 2 x 3,072 x 768 rows more
    assert "231 M parameters" in short.output
    base = load_config("base")
    assert sizes(with_positions(base, 4096)).language - sizes(base).language == 2 * 3072 * 768
    assert with_positions(base, 512) is base
    # the decoder's self-attention keeps heads x target² only where attention dropout stops SDPA's fused kernel
    plain, dropped = sizes(load_config("tiny")), sizes(base)
    assert plain.attention_dropout == 0 and dropped.attention_dropout == 0.1

    def growth(s) -> float:  # (f(2000) - f(1000)) / (f(1000) - f(0)) of the kept activations: 1 when linear
        kept = [activations(s, "full", Shape(128, 20, target), False)[0] for target in (0, 1000, 2000)]
        return (kept[2] - kept[1]) / (kept[1] - kept[0])

    assert growth(plain) == pytest.approx(1.0) and growth(dropped) > 1.5

@pytest.mark.slow
@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_predicted_peak_within_15_percent_at_2000_target_tokens(attention_dropout: float, tmp_path: Path) -> None:
    """~15 s: one measured training step (benchmarks/_measure.py) of the tiny model grown to 4,096 positions."""
    from benchmarks.memory import measure, predict
    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny()
    grow_positions(model, 4096, "copy", processor)
    model.config.text_config.attention_dropout = attention_dropout
    model.save_pretrained(tmp_path)
    spec = {"model": str(tmp_path), "mode": "full", "batch": 1, "checkpointing": False, "device": "cpu",
            "precision": "fp32", "image_size": 128, "prompt": 20, "target": 2000}
    row = measure(spec)
    assert "error" not in row, row
    ratio = row["measured"] / predict(spec)
    print(f"attention dropout {attention_dropout}: measured/predicted {ratio:.3f}")
    assert 0.85 <= ratio <= 1.15  # measured 1.01 (dropout 0) and 1.06 (0.1)
