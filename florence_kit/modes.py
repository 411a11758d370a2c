"""Which parts of Florence-2 train, per mode: a table, applied by one ``requires_grad_`` loop.

Components: ``vision`` (DaViT tower), ``projector`` (multi-modal projector), ``language`` (BART
encoder-decoder; the LM head is tied to its embeddings). "Frozen" means frozen for real: no
gradients, no optimizer state, forward under ``torch.no_grad()`` and in eval mode (see train.py).
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Mode(str, Enum):
    """Fine-tuning modes available on the command line."""

    full = "full"
    frozen_encoder = "frozen-encoder"


COMPONENTS = {
    "vision": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language": "model.language_model",
}

PLAN: dict[Mode, dict[str, str]] = {
    Mode.full: {"vision": "full", "projector": "full", "language": "full"},
    Mode.frozen_encoder: {"vision": "frozen", "projector": "full", "language": "full"},
}


def component(model: Any, name: str) -> Any:
    """The submodule behind a component name (works on the unwrapped native model)."""
    module = model
    for attr in COMPONENTS[name].split("."):
        module = getattr(module, attr)
    return module


def apply_mode(model: Any, mode: Mode | str) -> dict[str, str]:
    """Set ``requires_grad`` per component as the mode's plan says; returns the plan."""
    plan = PLAN[Mode(mode)]
    for name, setting in plan.items():
        component(model, name).requires_grad_(setting != "frozen")
    model.lm_head.requires_grad_(plan["language"] != "frozen")
    return plan


def frozen_components(mode: Mode | str) -> list[str]:
    return [name for name, setting in PLAN[Mode(mode)].items() if setting == "frozen"]


def trainable_counts(model: Any) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters per component: what `finetune` prints and the tests check."""
    out = {}
    for name in COMPONENTS:
        params = list(component(model, name).parameters())
        out[name] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return out
