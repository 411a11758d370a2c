"""Test-only tools: they inspect or undo what florence-kit does, which the package itself never needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def wrapped_modules(model: Any) -> list[str]:
    """Names of the modules that carry a LoRA adapter."""
    return [name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")]


def verify_checkpoint(path: Path) -> None:
    """Read every file of a checkpoint this test suite wrote; raises if one is unreadable.

    Accelerate's optimizer, scheduler and RNG files are pickles: loaded with ``weights_only=False``, which is
    safe only because the test wrote them itself a moment ago.
    """
    import torch
    from safetensors.torch import load_file

    from florence_kit.train.checkpoints import STATE_FILE, WEIGHTS_FILE, TrainState

    TrainState.from_file(path / STATE_FILE)
    load_file(str(path / WEIGHTS_FILE))
    for file in path.iterdir():
        if file.suffix in {".bin", ".pkl", ".pt"}:
            torch.load(file, weights_only=False)


def polygons_to_mask(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> np.ndarray:
    """Polygons rasterised by pycocotools, as the mask metrics do: an (h, w) uint8 mask."""
    from florence_kit.common.masks import coco_mask, polygons_to_rle

    return coco_mask().decode(polygons_to_rle(polygons, size))


def with_a_gradient(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` less its attention key biases, whose gradient is zero in exact arithmetic (softmax ignores the
    constant ``q . b_k`` added to all of one query's scores): computed, it is rounding noise, and Adam turns
    noise into moves of up to lr a step either way. (DaViT's channel attention sums over tokens, not channels:
    its key bias is a real parameter.)"""
    if name.endswith("k_proj.bias"):
        return tensor[:0]
    if name.endswith("window_attn.qkv.bias"):  # DaViT's spatial attention: [query | key | value]
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor


def relative_difference(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor, name: str) -> float:
    """|a - b| / |b - start| (L2 norms) over the entries of a tensor that have a gradient (b unmoved: 0 if a = b)."""
    a, b, start = (with_a_gradient(name, t.float()) for t in (a, b, start))
    moved = float((b - start).norm())
    return float((a - b).norm()) / moved if moved else float((a - b).norm() > 0)
