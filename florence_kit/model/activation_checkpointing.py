"""Gradient (activation) checkpointing for the whole of Florence-2, vision tower included.

transformers checkpoints only its ``GradientCheckpointingLayer`` subclasses: in Florence-2 those are the
BART encoder/decoder layers. The DaViT blocks of the vision tower are plain ``nn.Module`` s, and at
768×768 they hold most of the activation memory of a full fine-tune (the first stage alone runs at
192×192 tokens), so they are wrapped here with ``torch.utils.checkpoint`` too: only each block's input
is kept, and the block is recomputed during the backward pass.
"""

from __future__ import annotations

from typing import Any

VISION_BLOCK_CLASS = "Florence2VisionBlock"


def _checkpointed(forward: Any) -> Any:
    """``forward`` run under non-reentrant checkpointing, but only when a backward pass will follow."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def run(hidden_states: Any) -> Any:
        module = forward.__self__
        if module.training and torch.is_grad_enabled():
            # preserve_rng_state (the default) replays DropPath with the same random mask
            return checkpoint(forward, hidden_states, use_reentrant=False)
        return forward(hidden_states)

    run.florence_kit_checkpointed = True  # type: ignore[attr-defined]
    return run


def vision_blocks(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__ == VISION_BLOCK_CLASS]


def enable_gradient_checkpointing(model: Any) -> dict[str, int]:
    """Checkpoint every BART layer (transformers, ``use_reentrant=False``) and every DaViT block (here).

    Non-reentrant checkpointing needs no ``enable_input_require_grads`` trick, so it also works when the
    layers below are frozen (frozen-encoder, lora). Returns how many layers of each kind are checkpointed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x naming
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = vision_blocks(model)
    for block in blocks:
        if not getattr(block.forward, "florence_kit_checkpointed", False):
            block.forward = _checkpointed(block.forward)
    language = sum(
        1 for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    )
    return {"vision": len(blocks), "language": language}


def disable_gradient_checkpointing(model: Any) -> None:
    """Undo ``enable_gradient_checkpointing`` (the instance ``forward`` falls back to the class one).

    FSDP's plain copy for evaluation needs it: its copied DaViT blocks' checkpointed forwards would call the
    original, sharded blocks.
    """
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    for block in vision_blocks(model):
        if getattr(block.forward, "florence_kit_checkpointed", False):
            del block.forward
