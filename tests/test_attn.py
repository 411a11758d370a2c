"""--attn auto|sdpa|flash|eager: auto is SDPA on CPU; flash without the package or a GPU is one clear error."""

from __future__ import annotations

import pytest

from florence_kit.common.errors import UserError
from florence_kit.model.attention import FLASH, apply_attn, resolve_attn


def test_auto_is_sdpa_without_flash_attn_or_a_gpu(monkeypatch):
    import florence_kit.model.attention as attention

    monkeypatch.setattr(attention, "flash_installed", lambda: False)
    assert resolve_attn("auto", cuda=False, precision="fp32") == ("sdpa", "flash-attn is not installed")
    monkeypatch.setattr(attention, "flash_installed", lambda: True)
    assert resolve_attn("auto", cuda=False, precision="fp32") == ("sdpa", "there is no CUDA GPU")
    assert resolve_attn("auto", cuda=True, precision="fp32") == ("sdpa", "flash-attn runs in bf16/fp16, not fp32")
    assert resolve_attn("auto", cuda=True, precision="bf16")[0] == FLASH
    assert resolve_attn("eager", cuda=True, precision="bf16") == ("eager", "as asked")


def test_flash_without_the_package_or_a_gpu_names_the_fix(monkeypatch):
    import florence_kit.model.attention as attention

    monkeypatch.setattr(attention, "flash_installed", lambda: False)
    with pytest.raises(UserError, match=r'pip install "florence-kit\[flash\]"'):
        resolve_attn("flash", cuda=True, precision="bf16")
    monkeypatch.setattr(attention, "flash_installed", lambda: True)
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_attn("flash", cuda=False, precision="bf16")
    with pytest.raises(UserError, match="--attn must be one of auto, sdpa, flash, eager"):
        resolve_attn("xformers", cuda=False, precision="fp32")


def test_eager_and_sdpa_give_the_same_loss():
    import torch

    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny(seed=0)
    model.eval()
    from PIL import Image

    batch = processor(images=[Image.new("RGB", (64, 64), "white")] * 2, text=["<DocVQA>a b c", "<DocVQA>a"],
                      return_tensors="pt", padding="longest")
    labels = processor.tokenizer(["yes", "no it is"], return_tensors="pt", padding="longest")["input_ids"]
    losses = {}
    for impl in ("eager", "sdpa"):
        apply_attn(model, impl)
        assert model.model.language_model.config._attn_implementation == impl
        with torch.no_grad():
            losses[impl] = float(model(**batch, labels=labels).loss)
    print(f"eager vs sdpa loss: relative difference {abs(losses['eager'] / losses['sdpa'] - 1):.3g}")
    # SDPA's kernel takes the softmax in blocks (another order of the same float32 sums): a few ulps through four
    # layers, ~1e-7 of the loss. A padded key attended to, or a missing causal mask, changes it by > 1e-3.
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_attn_flash_without_the_package_exits_2(tiny_dir, docvqa_dir, tmp_path, command, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    import florence_kit.model.attention as attention
    from florence_kit.cli import app

    monkeypatch.setattr(attention, "flash_installed", lambda: False)
    if command == "eval":
        args = ["eval", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--max-samples", "2",
                "--output-dir", str(tmp_path / "eval"), "--quiet"]
    else:
        Image.new("RGB", (32, 32), "white").save(tmp_path / "page.png")
        args = ["predict", str(tmp_path / "page.png"), "--model", str(tiny_dir), "--question", "total?"]
    result = CliRunner().invoke(app, [*args, "--attn", "flash"])
    assert result.exit_code == 2, result.output
    assert 'pip install "florence-kit[flash]"' in " ".join(result.output.split())
    assert not (tmp_path / "eval").exists()
    result = CliRunner().invoke(app, [*args, "--attn", "eager"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("cuda", [False, True])
def test_eval_predict_serve_generate_on_the_gpu_when_there_is_one(tiny_dir, monkeypatch, cuda):
    """load_for_generation (eval, predict, serve) moves a PyTorch model to CUDA when a GPU is there, before the
    --attn decision; without one the model stays on the CPU."""
    import torch

    import florence_kit.model.loading as loading

    moved: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(str(a[0])) or self)
    decided: list = []
    monkeypatch.setattr(loading, "set_attention", lambda model, attn: decided.append((attn, list(moved))))
    model, _ = loading.load_for_generation(str(tiny_dir), "sdpa")
    assert moved == (["cuda"] if cuda else [])
    assert decided == [("sdpa", moved)]  # the kernel is chosen for the device the model ended on
