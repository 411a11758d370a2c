"""``--compile``: regional ``torch.compile`` of Florence-2's repeated blocks.

Compiling the whole model recompiles whenever a batch's text length changes and takes minutes; compiling
each repeated block (every DaViT block, every BART encoder/decoder layer) compiles one graph per block
class and reuses it across the blocks of that class, so the first step costs seconds to a minute and the
many small element-wise operations inside a block (layer norms, GELU, residual adds, the window
reshapes of DaViT) are fused. The embeddings, the projector, the LM head and the loss stay eager.
"""

from __future__ import annotations

from typing import Any

VISION_BLOCK_CLASS = "Florence2VisionBlock"


def regions(model: Any) -> list[Any]:
    """The repeated blocks: DaViT blocks and BART layers (transformers' GradientCheckpointingLayer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m for m in model.modules()
        if type(m).__name__ == VISION_BLOCK_CLASS or isinstance(m, GradientCheckpointingLayer)
    ]


def compile_regions(model: Any) -> int:
    """``module.compile()`` every repeated block in place; returns how many were compiled.

    DaViT blocks compile with static shapes: an image's size is fixed by the processor, so each of the four
    stages has one shape (four graphs), and dynamic shapes there trip over the channel attention's
    token-count head size (on an H200, minutes of recompiling). BART layers compile with
    ``dynamic=None``: text lengths vary between batches, and torch marks the length dynamic after it has
    seen it change once instead of compiling one graph per length.
    """
    blocks = regions(model)
    for block in blocks:
        block.compile(dynamic=False if type(block).__name__ == VISION_BLOCK_CLASS else None)
    return len(blocks)
