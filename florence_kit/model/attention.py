"""``--attn auto|sdpa|flash|eager``: which attention kernel the language model (BART) runs.

PyTorch's SDPA is the default everywhere. flash-attn 2 (the ``flash`` extra) runs unpadded sequences, which pays
on the padded batches of fine-tuning and batched generation, but it needs the package, a CUDA GPU and a half
precision (bf16/fp16). ``auto`` takes it where all three are there and SDPA otherwise; asking for ``flash``
where one is missing is an error naming the fix. The DaViT vision tower has its own attention and keeps it.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from florence_kit.common.errors import UserError

ATTN_CHOICES = ("auto", "sdpa", "flash", "eager")
FLASH = "flash_attention_2"  # transformers' name for flash-attn 2
FLASH_INSTALL = 'pip install "florence-kit[flash]"'
HALF = ("bf16", "fp16")


@functools.cache
def flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn(requested: str, *, cuda: bool, precision: str) -> tuple[str, str]:
    """(transformers' attn_implementation, why) for ``--attn requested`` on this device and precision."""
    if requested not in ATTN_CHOICES:
        raise UserError(f"--attn must be one of {', '.join(ATTN_CHOICES)}, got '{requested}'")
    if requested in ("sdpa", "eager"):
        return requested, "as asked"
    missing = ("flash-attn is not installed" if not flash_installed() else "there is no CUDA GPU" if not cuda
               else f"flash-attn runs in bf16/fp16, not {precision}" if precision not in HALF else "")
    if requested == "flash":
        if missing:
            fix = FLASH_INSTALL if not flash_installed() else (
                "use --attn sdpa on this machine" if not cuda else "add --precision bf16 (or fp16)")
            raise UserError(f"--attn flash: {missing}; {fix}")
        return FLASH, "as asked"
    if missing:
        return "sdpa", missing
    return FLASH, f"flash-attn installed, CUDA, {precision}"


def apply_attn(model: Any, implementation: str) -> None:
    """Switch the language model's attention; the vision tower is left as it is."""
    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    native.set_attn_implementation({"text_config": implementation})


def attn_line(requested: str, implementation: str, why: str) -> str:
    name = {FLASH: "flash-attn 2"}.get(implementation, implementation)
    return f"attention: {name} ({'--attn ' + requested + ', ' if requested != 'auto' else 'auto: '}{why})"


def set_attention(model: Any, requested: str) -> str:
    """``--attn`` for eval, predict and serve: decided from where the model is and its dtype, then applied."""
    import torch

    param = next(iter(model.parameters()), None)
    if param is None or getattr(model, "runs_onnx", False):  # an ONNX export (model/onnx_runtime.py): its graphs
        # hold the attention they were exported with
        if requested not in ("auto", "sdpa"):
            raise UserError(f"--attn {requested} applies to PyTorch models; an ONNX export runs the attention of its "
                            "graphs: leave --attn out")
        return "onnx"
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(param.dtype, "fp32")
    implementation, _ = resolve_attn(requested, cuda=param.is_cuda, precision=precision)
    apply_attn(model, implementation)
    return implementation
