"""Vision-feature cache (``--cache-vision-features``): with the vision tower frozen, run DaViT once per image.

A frozen tower is a pure function of (weights, pixels), so its output for an image never changes during a
run: later epochs and other questions about the same page can read it back instead of recomputing it.
What is cached is the vision tower's ``last_hidden_state`` — *before* the multi-modal projector — because
the projector trains in every frozen-encoder/LoRA mode (caching projected features would freeze it too).

Entries are keyed by a fingerprint of the tower's weights + a hash of the processed pixels (which fixes the
image content and size), stored as one fp16 ``.npy`` file each and read back memory-mapped.  A cache folder
can therefore be shared across runs of the same model: other weights or another resolution give other keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

STORE_DTYPES = ("float16", "float32")


def model_fingerprint(module: Any) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, values) of ``module``."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def image_key(pixels: Any) -> str:
    """Hash of one processed image (its shape is part of the key: the same page at another size differs)."""
    t = pixels.detach().cpu().float().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()[:32]


class VisionFeatureCache:
    """On-disk, memory-mapped cache of frozen vision-tower features under ``root/<model fingerprint>/``."""

    def __init__(self, root: str | Path, vision_tower: Any, dtype: str = "float16", compute: str = "") -> None:
        """``compute`` names the precision the tower runs in (``bf16``, ``fp16``, ``no``): features computed
        under bf16 autocast differ from fp32 ones, so runs of other precisions sharing ``root`` keep apart."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}")
        self.dtype = dtype
        self.dir = Path(root) / (model_fingerprint(vision_tower) + (f"-{compute}" if compute else ""))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.npy"

    def features(self, vision_tower: Any, pixel_values: Any) -> Any:
        """``vision_tower(pixel_values).last_hidden_state``, computed only for images not cached yet.

        Misses run through the tower as one batch and are written before being returned; every row of the
        result is the stored (fp16-rounded) value, so a first epoch and a cached epoch see the same numbers.
        """
        import numpy as np
        import torch

        keys = [image_key(p) for p in pixel_values]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # two questions on one page: one forward
        missing = [i for k, i in first.items() if not self._path(k).exists()]
        if missing:
            with torch.no_grad():
                fresh = vision_tower(pixel_values[missing]).last_hidden_state
            for i, feats in zip(missing, fresh, strict=True):
                self._write(keys[i], feats.detach().float().cpu().numpy().astype(self.dtype))
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = [torch.from_numpy(np.array(np.load(self._path(k), mmap_mode="r"))) for k in keys]
        return torch.stack(rows).to(device=pixel_values.device, dtype=pixel_values.dtype)

    def _write(self, key: str, array: Any) -> None:
        """Write-then-rename, so an interrupted run never leaves a truncated entry behind."""
        import numpy as np

        path = self._path(key)
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
