"""Which parts of Florence-2 train, per mode: a table, applied by one ``requires_grad_`` loop.

Components: ``vision`` (DaViT tower), ``projector`` (multi-modal projector), ``language`` (BART
encoder-decoder; the LM head is tied to its embeddings). Each gets a setting, torchtune style:
``full`` (every weight trains), ``lora`` (only the LoRA matrices PEFT adds train; the base weights
stay bit-identical) or ``frozen``. "Frozen" means frozen for real: no gradients, no optimizer state,
forward under ``torch.no_grad()`` and in eval mode (see train.py). ``lora``/``qlora`` models are
wrapped by PEFT first (florence_kit/model/adapters.py); this module only decides which tensors train.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Mode(str, Enum):
    """Fine-tuning modes available on the command line."""

    full = "full"
    frozen_encoder = "frozen-encoder"
    lora = "lora"
    qlora = "qlora"


COMPONENTS = {
    "vision": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language": "model.language_model",
}

PLAN: dict[Mode, dict[str, str]] = {
    Mode.full: {"vision": "full", "projector": "full", "language": "full"},
    Mode.frozen_encoder: {"vision": "frozen", "projector": "full", "language": "full"},
    # the projector is small and maps vision features into a space LoRA cannot move: it trains fully
    # (as a PEFT ``modules_to_save`` copy, so it is saved with the adapter and the base stays untouched)
    Mode.lora: {"vision": "frozen", "projector": "full", "language": "lora"},
    Mode.qlora: {"vision": "frozen", "projector": "full", "language": "lora"},
}
ADAPTER_MODES = (Mode.lora, Mode.qlora)

# Peak learning rate when --lr is not given. Full fine-tuning of a pretrained model moves every weight and
# wants a small rate; LoRA's low-rank updates (scaled by alpha/r) need about ten times more to move at all
# (the LoRA and QLoRA papers train at 1e-4 to 2e-4): at 1e-5 a LoRA run barely leaves its starting loss.
DEFAULT_LR: dict[Mode, float] = {Mode.full: 1e-5, Mode.frozen_encoder: 1e-5, Mode.lora: 1e-4, Mode.qlora: 1e-4}


def learning_rate(lr: float | None, mode: Mode | str) -> float:
    """The run's peak learning rate: ``lr`` when given, else the mode's default."""
    return DEFAULT_LR[Mode(mode)] if lr is None else lr


def plan_for(mode: Mode | str, lora_vision: bool = False) -> dict[str, str]:
    """The mode's plan; ``lora_vision`` adapts the vision tower too (LoRA modes only)."""
    plan = dict(PLAN[Mode(mode)])
    if lora_vision and Mode(mode) in ADAPTER_MODES:
        plan["vision"] = "lora"
    return plan


def unwrap(model: Any) -> Any:
    """The native Florence2ForConditionalGeneration inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def component(model: Any, name: str) -> Any:
    """The submodule behind a component name (works on the native model and on a PEFT wrapper)."""
    module = unwrap(model)
    for attr in COMPONENTS[name].split("."):
        module = getattr(module, attr)
    return module


def _trains(setting: str, param_name: str) -> bool:
    if setting == "frozen":
        return False
    if setting == "lora":
        return "lora_" in param_name
    # PEFT keeps the untouched original of a ``modules_to_save`` module next to the trained copy
    return "original_module" not in param_name


def apply_mode(model: Any, mode: Mode | str, lora_vision: bool = False) -> dict[str, str]:
    """Set ``requires_grad`` per component as the mode's plan says; returns the plan."""
    plan = plan_for(mode, lora_vision)
    for name, setting in plan.items():
        for param_name, param in component(model, name).named_parameters():
            if param.is_floating_point():  # 4-bit base weights are packed integers: never trainable
                param.requires_grad_(_trains(setting, param_name))
    unwrap(model).lm_head.requires_grad_(plan["language"] == "full")  # tied to the (frozen) embeddings otherwise
    return plan


def frozen_components(mode: Mode | str, lora_vision: bool = False) -> list[str]:
    return [name for name, setting in plan_for(mode, lora_vision).items() if setting == "frozen"]


def numel(param: Any) -> int:
    """Logical size of a parameter: a 4-bit (bitsandbytes) weight stores two values per byte."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def trainable_counts(model: Any) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters per component: what `finetune` prints and the tests check.

    With LoRA the totals include the adapter matrices and, for the projector, PEFT's trained copy
    next to the frozen original.
    """
    out = {}
    for name in COMPONENTS:
        params = list(component(model, name).parameters())
        out[name] = (sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params))
    return out


def summary(counts: dict[str, tuple[int, int]]) -> str:
    """One line: total trainable of total, then per part (vision, projector, language model)."""
    trainable = sum(t for t, _ in counts.values())
    total = sum(n for _, n in counts.values())
    parts = ", ".join(f"{k} {t:,}/{n:,}" for k, (t, n) in counts.items())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%); {parts}"
