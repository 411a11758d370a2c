"""The training modes as one table (:data:`TABLE`), and which parts of Florence-2 train, applied by one loop.

Each row says what ``--mode NAME`` means: a setting per component, whether the base is stored in 4 bits, the
default learning rate and optimizer. Everything else (the memory model, loading, the CLI's choices, the run
folder's card, the refusals) reads the row, so a new mode is a new row plus whatever new behaviour it needs.

Components: ``vision`` (DaViT tower), ``projector`` (multi-modal projector), ``language`` (BART
encoder-decoder; the LM head is tied to its embeddings). Each gets a setting, torchtune style:
``full`` (every weight trains), ``lora`` (only the LoRA matrices PEFT adds train; the base weights
stay bit-identical) or ``frozen``. "Frozen" means frozen for real: no gradients, no optimizer state,
forward under ``torch.no_grad()`` and in eval mode (train/step.py, train/loop.py). A mode with a ``lora`` setting is
wrapped by PEFT first (florence_kit/model/adapters.py); this module only decides which tensors train.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

SETTINGS = ("full", "lora", "frozen")  # what a component can do: every weight trains, only LoRA's, none
# What the code implements, per component: PEFT wraps the language model (adapters.wrap_lora; the vision tower
# only with --lora-vision, the projector never: it trains as a saved copy), and memory.py's activation
# coefficients are measured for a language model that trains fully or through LoRA.
IMPLEMENTED = {"vision": ("full", "frozen"), "projector": ("full",), "language": ("full", "lora")}
QUANT_BITS = (None, 4)  # base storage loading can make (model/loading.load_quantized: NF4) and memory.py sizes
COMPONENTS = {
    "vision": "model.vision_tower",
    "projector": "model.multi_modal_projector",
    "language": "model.language_model",
}


@dataclass(frozen=True)
class TrainingMode:
    """One row of the modes table: everything the package decides from ``--mode``.

    Read by the trainable-parameter plan (:func:`apply_mode`), the memory model (model/memory.py: which
    parameters get gradients and optimizer state follows from the component settings, how base weights are
    stored from ``quant_bits``), loading (4-bit when ``quant_bits`` is 4), the optimizer and learning-rate
    defaults, and the refusals that depend on adapters (FSDP, ``--lora-vision``).
    """

    name: str  # the --mode value
    vision: str  # a setting (SETTINGS) per component, among those IMPLEMENTED
    projector: str
    language: str  # "full" also trains the LM head (tied to the token embeddings)
    lr: float  # peak learning rate when --lr is not given
    quant_bits: int | None = None  # base Linear weights stored in this many bits (4: NF4 via bitsandbytes)
    optim_8bit: bool = False  # default optimizer: bitsandbytes' 8-bit AdamW (paged on CUDA)

    def __post_init__(self) -> None:
        """A row the code cannot run is refused when the table is built, not when a run reaches it."""
        settings = {"vision": self.vision, "projector": self.projector, "language": self.language}
        if any(settings[name] not in allowed for name, allowed in IMPLEMENTED.items()):
            raise ValueError(f"mode {self.name!r}: settings must be among {IMPLEMENTED}, got {settings}")
        if self.adapters and self.vision != "frozen":
            raise ValueError(f"mode {self.name!r}: an adapter run saves the adapter and the projector's copy only "
                             "(adapters.save_adapter): its vision tower stays frozen (or gets LoRA with --lora-vision)")
        if self.quant_bits not in QUANT_BITS:
            raise ValueError(f"mode {self.name!r}: quant_bits must be among {QUANT_BITS}, got {self.quant_bits}")
        if self.quant_bits is not None and not self.adapters:
            raise ValueError(f"mode {self.name!r}: quantised weights get no gradients: a quantised base trains "
                             "through LoRA")

    @property
    def adapters(self) -> bool:
        """PEFT wraps the model: the trained tensors are LoRA matrices and copies beside the base weights."""
        return "lora" in (self.vision, self.projector, self.language)

    def plan(self, lora_vision: bool = False) -> dict[str, str]:
        """Setting per component; ``lora_vision`` adapts the frozen vision tower too (adapter modes only)."""
        vision = "lora" if lora_vision and self.adapters else self.vision
        return {"vision": vision, "projector": self.projector, "language": self.language}


# Learning rates: full fine-tuning of a pretrained model moves every weight and wants a small rate; LoRA's
# low-rank updates (scaled by alpha/r) need about ten times more to move at all (the LoRA and QLoRA papers train
# at 1e-4 to 2e-4): at 1e-5 a LoRA run barely leaves its starting loss.
# The projector is small and maps vision features into a space LoRA cannot move: in the LoRA modes it trains
# fully (as a PEFT ``modules_to_save`` copy, so it is saved with the adapter and the base stays untouched).
TABLE: dict[str, TrainingMode] = {row.name: row for row in (
    TrainingMode("full", vision="full", projector="full", language="full", lr=1e-5),
    TrainingMode("frozen-encoder", vision="frozen", projector="full", language="full", lr=1e-5),
    TrainingMode("lora", vision="frozen", projector="full", language="lora", lr=1e-4),
    TrainingMode("qlora", vision="frozen", projector="full", language="lora", lr=1e-4, quant_bits=4,
                 optim_8bit=True),
)}

# The --mode choices, in the table's order (Typer reads an Enum; members are the names with ``_`` for ``-``).
Mode = Enum("Mode", [(name.replace("-", "_"), name) for name in TABLE], type=str)  # type: ignore[misc]
Mode.__doc__ = "Fine-tuning modes available on the command line (one per row of TABLE)."
ADAPTER_MODES = tuple(name for name, row in TABLE.items() if row.adapters)


def listing(names: Any) -> str:
    """Mode names as a message lists them: ``a, b or c``."""
    names = list(names)
    return " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


# what a message says to do when the vision tower must be frozen (--cache-vision-features)
FROZEN_VISION_HINT = f"use --mode {listing(n for n, r in TABLE.items() if r.vision == 'frozen')} " \
    "(without --lora-vision)"


def mode_row(mode: str) -> TrainingMode:
    """The table's row for a mode name or Mode member; an unknown name is a ValueError."""
    name = getattr(mode, "value", mode)
    if name not in TABLE:
        raise ValueError(f"unknown mode {name!r}; known: {', '.join(TABLE)}")
    return TABLE[name]


def learning_rate(lr: float | None, mode: str) -> float:
    """The run's peak learning rate: ``lr`` when given, else the mode's default."""
    return mode_row(mode).lr if lr is None else lr


def plan_for(mode: str, lora_vision: bool = False) -> dict[str, str]:
    """The mode's plan; ``lora_vision`` adapts the vision tower too (LoRA modes only)."""
    return mode_row(mode).plan(lora_vision)


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


def apply_mode(model: Any, mode: str, lora_vision: bool = False) -> dict[str, str]:
    """Set ``requires_grad`` per component as the mode's plan says; returns the plan."""
    plan = plan_for(mode, lora_vision)
    for name, setting in plan.items():
        for param_name, param in component(model, name).named_parameters():
            if param.is_floating_point():  # 4-bit base weights are packed integers: never trainable
                param.requires_grad_(_trains(setting, param_name))
    unwrap(model).lm_head.requires_grad_(plan["language"] == "full")  # tied to the (frozen) embeddings otherwise
    return plan


def frozen_components(mode: str, lora_vision: bool = False) -> list[str]:
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
