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


def compile_regions(model: Any, dynamic: bool | None = None) -> int:
    """``module.compile()`` every repeated block in place; returns how many were compiled.

    ``dynamic=None`` lets torch mark a dimension dynamic after it has seen it change once (text lengths
    vary between batches), instead of recompiling for every length.
    """
    blocks = regions(model)
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)
