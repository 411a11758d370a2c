"""--cache-vision-features: the frozen tower runs once per distinct image, and training losses do not change."""

from __future__ import annotations

from pathlib import Path

import pytest

from florence_kit.common.errors import UserError
from florence_kit.train.runfolder import RunFolder


def _train(tiny_dir: Path, docvqa_dir: Path, docvqa_task, out: Path, **cfg_kw) -> tuple[list[float], object]:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.loop import train_loop

    model = Florence2ForConditionalGeneration.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tower = model.model.vision_tower
    calls = {"images": 0}
    original = tower.forward

    def counting_forward(pixel_values, *a, **kw):
        calls["images"] += pixel_values.shape[0]
        return original(pixel_values, *a, **kw)

    tower.forward = counting_forward
    dataset = TaskDataset(load_split(docvqa_task, str(docvqa_dir), "train"), docvqa_task, with_target=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=out, batch_size=8, lr=1e-3,
                      max_steps=4, log_every=100, **cfg_kw)
    losses: list[float] = []
    train_loop(model, processor, dataset, cfg, RunFolder(out),
               on_step=lambda step, total, loss, lr: losses.append(loss))
    return losses, calls["images"]


def test_cached_training_gives_the_same_losses(tiny_dir, docvqa_dir, docvqa_task, tmp_path):
    import datasets

    pages = len(set(datasets.load_from_disk(str(docvqa_dir))["train"]["docId"]))
    rows = datasets.load_from_disk(str(docvqa_dir))["train"].num_rows
    plain, plain_images = _train(tiny_dir, docvqa_dir, docvqa_task, tmp_path / "plain", mode="frozen-encoder")
    cached, cached_images = _train(tiny_dir, docvqa_dir, docvqa_task, tmp_path / "cached", mode="frozen-encoder",
                                   cache_vision_features=True)
    assert len(plain) == len(cached) == 4  # 4 steps of 8 over 24 questions: into the second epoch
    worst = max(abs(c - p) / p for c, p in zip(cached, plain, strict=True))
    print(f"cached vs plain losses: worst relative difference {worst:.3g}")
    # The cache stores features as float16: each moves by <= 2**-11 = 4.9e-4 of itself. Serving every question the
    # batch's first page (features off by ~100%) moves this tiny model's losses by 1.4e-3, so rounding moves them by
    # ~4.9e-4 x 1.4e-3 = 7e-7 (measured 4e-7, on any kernels: float16 rounding, not float32 noise, dominates).
    assert cached == pytest.approx(plain, rel=1e-5)
    assert plain_images == 4 * 8
    assert cached_images == pages < rows  # DaViT ran once per distinct page, not per question or epoch
    entries = list((tmp_path / "cached" / "vision_cache").glob("*/*.npy"))
    assert len(entries) == pages
    # a second run reading the same cache folder does not run the tower at all
    again, again_images = _train(tiny_dir, docvqa_dir, docvqa_task, tmp_path / "again", mode="frozen-encoder",
                                 cache_vision_features=True, vision_cache_dir=tmp_path / "cached" / "vision_cache")
    assert again_images == 0
    assert again == cached  # bit for bit: both runs read the same float16 store and run the same kernels in order


def test_cache_needs_a_frozen_tower(tiny_dir, docvqa_dir, docvqa_task, tmp_path):
    with pytest.raises(UserError, match="frozen vision tower"):
        _train(tiny_dir, docvqa_dir, docvqa_task, tmp_path / "full", mode="full", cache_vision_features=True)


def test_keys_follow_weights_and_pixels(tiny_dir):
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.train.feature_cache import image_key, model_fingerprint

    tower = Florence2ForConditionalGeneration.from_pretrained(tiny_dir).model.vision_tower
    before = model_fingerprint(tower)
    assert model_fingerprint(tower) == before
    with torch.no_grad():
        next(tower.parameters()).view(-1)[0] += 1.0
    assert model_fingerprint(tower) != before
    pixels = torch.zeros(3, 32, 32)
    assert image_key(pixels) == image_key(pixels.clone())
    assert image_key(pixels) != image_key(torch.zeros(3, 64, 64))
    pixels[0, 0, 0] = 1.0
    assert image_key(pixels) != image_key(torch.zeros(3, 32, 32))


def test_runs_of_other_precisions_sharing_a_cache_keep_apart(tiny_dir, tmp_path):
    """bf16-autocast features are not fp32 ones: a shared --vision-cache-dir keeps one folder per precision."""
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.train.feature_cache import VisionFeatureCache

    tower = Florence2ForConditionalGeneration.from_pretrained(tiny_dir).model.vision_tower
    folders = {VisionFeatureCache(tmp_path, tower, compute=p).dir for p in ("no", "bf16", "fp16")}
    assert len(folders) == 3 and VisionFeatureCache(tmp_path, tower, compute="bf16").dir in folders
