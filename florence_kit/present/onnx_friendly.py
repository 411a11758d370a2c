"""Export-time forwards that compute what transformers' Florence-2 computes, in ops onnxruntime runs fast.

Profiled on the base model at 768 px (onnxruntime 1.32, 2-core CPU), three things in the exported graphs cost more
than they should:

- DaViT's channel attention permutes q, k and v to ``[batch, groups, head_dim, tokens]`` before the attention:
  onnxruntime runs those 5-D transposes of a whole feature map through its slow generic path (about a third of the
  int8 tower's time). Here q, k, v stay ``[batch, groups, tokens, head_dim]`` (a block move) and the attention is
  written as ``q^T k`` and ``v attn^T``, which onnxruntime fuses into ``FusedMatMul`` with transposed operands.
- ``F.gelu`` exports as ``0.5 * (1 + erf(x / sqrt 2)) * x``, an order onnxruntime's Gelu fusion does not match,
  so five element-wise passes over every MLP activation run at each layer. Written as ``(x * 0.5) * (1 + erf)``,
  it fuses into one Gelu kernel, in onnxruntime for Python and in Transformers.js alike (both fuse at load).
- The language model's attention is exported from transformers' eager path: ``q @ k^T`` as a 4-D matmul, which
  onnxruntime fuses with the transpose, where SDPA's export materialises a transposed copy of every layer's
  cached keys at each generated token (the base decoder step: 17 -> 9 ms with the placeholders of
  ``merge_decoders``). The vision tower keeps SDPA (eager is slower there).

All are the same arithmetic (the export's logits check holds them to PyTorch's); the graphs keep standard ONNX
ops only. :func:`export_friendly` swaps the forwards on the model's own modules (and the text model's attention
setting) and puts them back after.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def channel_attention(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Florence2VisionChannelAttention.forward`` without the feature-map transposes (same result)."""
    batch, tokens, channels = hidden_states.shape
    groups = self.groups
    qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, groups, channels // groups)
    query, key, value = (part.transpose(1, 2) for part in qkv.unbind(2))  # [batch, groups, tokens, head_dim]
    attention = (query.transpose(-1, -2) @ key) * tokens**-0.5  # channel x channel, per group
    attention = attention.softmax(dim=-1)
    out = value @ attention.transpose(-1, -2)  # [batch, groups, tokens, head_dim]
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


def gelu(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in the order onnxruntime's GeluFusion recognises."""
    return (x * 0.5) * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _is_exact_gelu(module: nn.Module) -> bool:
    act = getattr(module, "act", None)
    if type(module).__name__ == "GELUActivation":
        return act is nn.functional.gelu
    return isinstance(module, nn.GELU) and module.approximate == "none"


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s channel attentions and exact GELUs run the forwards above."""
    config = getattr(model, "config", None)
    parts = {key: getattr(config, key) for key in ("text_config",) if hasattr(config, key)}
    before = {key: part._attn_implementation for key, part in parts.items()}
    if parts:  # eager attention: q @ k^T as a matmul onnxruntime fuses with the transpose (SDPA exports a copy)
        model.set_attn_implementation(dict.fromkeys(parts, "eager"))
    patched: list[nn.Module] = []
    for module in model.modules():
        replacement = None
        if type(module).__name__ == "Florence2VisionChannelAttention" and hasattr(module, "groups"):
            replacement = channel_attention
        elif _is_exact_gelu(module):
            replacement = gelu
        if replacement is not None:
            module.forward = types.MethodType(replacement, module)  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # the class's own forward again
        if parts:
            model.set_attn_implementation(before)
