"""Export-time forwards that compute what transformers' Florence-2 computes, in ops onnxruntime runs fast.

Profiled on the base model at 768 px (onnxruntime 1.32, 2-core CPU), three things in the exported graphs cost more
than they should:

- DaViT's channel attention permutes q, k and v to ``[batch, groups, head_dim, tokens]`` before the attention:
  onnxruntime runs those 5-D transposes of a whole feature map through its slow generic path (about a third of the
  int8 tower's time). Here q, k, v stay ``[batch, groups, tokens, head_dim]`` (a block move) and the attention is
  written as ``q^T k`` and ``v attn^T``, which onnxruntime fuses into ``FusedMatMul`` with transposed operands.
- transformers keeps DaViT's feature map channels-first between blocks and transposes the whole map to
  tokens-last and back around every depthwise convolution (four full-map transposes per block). Here the map stays
  channels-last ``[batch, height, width, channels]`` and each convolution is written ``permute -> Conv ->
  permute``, which onnxruntime folds into the reorders of its blocked convolution layout (or, in the int8 graph,
  into its channels-last QLinearConv); the window attention splits q, k and v after one 4-D transpose of the qkv
  projection. The base tower's transposes: about half of what they were, ~12 % of its time.
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
import torch.nn.functional as F
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


def _conv_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A 2-D convolution of a ``[batch, height, width, channels]`` map: the permutes sit right beside the Conv, where
    onnxruntime folds them into its blocked layout's reorders (``ReorderInput``/``ReorderOutput`` channels-last)."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def window_attention(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Florence2VisionWindowAttention.forward`` with q, k and v taken apart by one 4-D transpose of the qkv
    projection (heads before tokens) and a split along the heads, instead of a 5-D permute and three gathers."""
    batch, height, width, channels = hidden_states.shape
    size = self.window_size
    pad_right, pad_bottom = (size - width % size) % size, (size - height % size) % size
    hidden_states = F.pad(hidden_states, (0, 0, 0, pad_right, 0, pad_bottom))
    padded_height, padded_width = height + pad_bottom, width + pad_right
    rows, cols = padded_height // size, padded_width // size
    windows = hidden_states.view(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(-1, size * size, channels)
    count, tokens = windows.shape[0], size * size
    heads = self.num_heads
    qkv = self.qkv(windows).reshape(count, tokens, 3 * heads, channels // heads).transpose(1, 2)
    query, key, value = qkv.split(heads, dim=1)  # [windows, heads, tokens, head_dim] each
    out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
    out = self.proj(out.transpose(1, 2).reshape(count, tokens, channels))
    out = out.view(batch, rows, cols, size, size, channels).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, padded_height, padded_width, channels)[:, :height, :width, :]
    return out.reshape(batch, height * width, channels)


def _block_nhwc(block: Any, x: torch.Tensor, attention: nn.Module, windows: bool) -> torch.Tensor:
    """A DaViT spatial (``windows``) or channel block on a ``[batch, height, width, channels]`` map; the
    arithmetic of ``Florence2Vision{Spatial,Channel}Block.forward``, which transposes to channels-first and back
    around each depthwise convolution."""
    batch, height, width, channels = x.shape
    x = _conv_nhwc(block.conv1, x) + x
    normed = block.norm1(x)
    mixed = attention(normed) if windows else attention(normed.reshape(batch, height * width, channels))
    x = x + block.drop_path1(mixed.view(batch, height, width, channels))
    x = _conv_nhwc(block.conv2, x) + x
    return x + block.drop_path2(block.ffn(block.norm2(x)))


def _conv_embed_nhwc(embed: Any, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``Florence2VisionConvEmbed.forward`` returning ``[batch, height, width, channels]``; ``x`` is the pixels
    (channels-first) or the previous stage's channels-last map."""
    if embed.norm and embed.pre_norm:
        x = embed.norm(x if channels_last else x.permute(0, 2, 3, 1))
        channels_last = True
    x = _conv_nhwc(embed.conv, x) if channels_last else embed.conv(x).permute(0, 2, 3, 1)
    if embed.norm and not embed.pre_norm:
        x = embed.norm(x)
    return x


def vision_backbone(self: Any, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
    """``Florence2VisionBackbone.forward`` with the feature map kept channels-last between the stages and blocks
    (transformers keeps it channels-first and transposes it twice per block): what the blocks compute is unchanged,
    and the only layout changes left are the ones beside each convolution, which onnxruntime folds away."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = hidden_states.to(dtype=self.convs[0].conv.weight.dtype)
    channels_last = False
    for embed, blocks in zip(self.convs, self.blocks, strict=True):
        x = _conv_embed_nhwc(embed, x, channels_last)
        channels_last = True
        for layer in blocks:
            x = _block_nhwc(layer.spatial_block, x, layer.spatial_block.window_attn, windows=True)
            x = _block_nhwc(layer.channel_block, x, layer.channel_block.channel_attn, windows=False)
    return BaseModelOutputWithPooling(last_hidden_state=x.permute(0, 3, 1, 2))


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
        kind = type(module).__name__
        if kind == "Florence2VisionChannelAttention" and hasattr(module, "groups"):
            replacement = channel_attention
        elif kind == "Florence2VisionWindowAttention" and hasattr(module, "window_size"):
            replacement = window_attention
        elif kind == "Florence2VisionBackbone" and hasattr(module, "convs") and hasattr(module, "blocks"):
            replacement = vision_backbone
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
