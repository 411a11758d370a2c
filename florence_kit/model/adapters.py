"""LoRA / QLoRA through PEFT, 4-bit loading and 8-bit AdamW through bitsandbytes.

Everything optional lives here, imported lazily: ``import florence_kit.model.adapters`` costs nothing,
and a missing bitsandbytes is one line that says ``pip install "florence-kit[quant]"``.

Target modules are anchored regexes, not a name list: PEFT matches a list by suffix, so
``["q_proj", ..., "fc1", "fc2"]`` would also wrap every ``fc1``/``fc2`` of the DaViT vision tower
(48 modules in Florence-2-base). The language pattern wraps exactly the BART attention q/k/v/out
projections (self- and cross-attention) and fc1/fc2: ``6 * encoder_layers + 10 * decoder_layers`` modules.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError, first_line
from florence_kit.model.checkpoint_io import (
    ADAPTER_CONFIG,
    clean_generation_config,
    load_native,
    locate,
    resolve_model_id,
)

LANGUAGE_TARGETS = (
    r"model\.language_model\.(encoder|decoder)\.layers\.\d+\."
    r"((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)"
)
# DaViT blocks: window/channel attention qkv + proj, and the MLP fc1/fc2 (the patch convs stay frozen)
VISION_TARGETS = (
    r"model\.vision_tower\.blocks\.\d+\.\d+\.(spatial|channel)_block\."
    r"((window|channel)_attn\.(qkv|proj)|ffn\.(fc1|fc2))"
)
PROJECTOR = "multi_modal_projector"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit")
QUANT_HINT = 'install it with `pip install "florence-kit[quant]"`'


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(what: str, instead: str) -> None:
    if not has_bitsandbytes():
        raise UserError(f"{what} needs bitsandbytes, which is not installed: {QUANT_HINT}, or use {instead}")


def target_modules(lora_vision: bool) -> str:
    """One regex (PEFT full-matches it against module names) for the modules to wrap."""
    return f"({LANGUAGE_TARGETS})|({VISION_TARGETS})" if lora_vision else LANGUAGE_TARGETS


def quantization_config() -> Any:
    """4-bit NF4 with double quantisation; the projector (trained fully) and tied lm_head stay unquantised."""
    import torch
    from transformers import BitsAndBytesConfig

    from florence_kit.model.precision import device_facts

    # the dtype the 4-bit layers compute in follows the run's autocast: bf16 where the GPU has it natively,
    # fp16 on older GPUs (a T4 answers torch.cuda.is_bf16_supported() with True, but only emulates bf16)
    facts = device_facts()
    compute = torch.bfloat16 if facts.bf16 else torch.float16 if facts.cuda else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=[f"model.{PROJECTOR}", "lm_head"],  # prefixes: a bare name would not match
    )


def own_unquantized_weights(model: Any) -> None:
    """Copy the CPU tensors that still view the memory-mapped checkpoint, so that the mapping is closed.

    from_pretrained memory-maps a safetensors checkpoint and leaves every tensor it does not convert (the
    unquantised embeddings, convolutions, norms, projector) as a view into that mapping. Any one of them keeps
    the whole mapping alive, and with it every page read while the Linear weights were quantised: their full-
    precision originals (4 B per weight in an fp32 checkpoint, ~0.7 GB for Florence-2-base) stayed resident
    for the whole run, next to their 4-bit copies. Copying the few unquantised tensors (~0.2 GB for base)
    drops that. Tensors on a GPU were already copied off the mapping while they were moved there.
    """
    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is None or id(param) in seen or param.device.type != "cpu":
                    continue
                seen.add(id(param))  # tied weights (the LM head and the token embeddings) are copied once
                if type(param).__name__ != "Params4bit":  # 4-bit weights were made by the quantiser, not mapped
                    param.data = param.data.clone()  # the same Parameter: ties and references stay
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type == "cpu":
                    # a new tensor, not ``.data =``: a buffer loaded as a view keeps its base (and so the
                    # mapping) alive through its autograd view metadata whatever its data is
                    module._buffers[name] = buffer.clone()


def _try_4bit_forward(model: Any) -> None:
    """Run one 4-bit layer once: some CPUs/kernels load NF4 weights but fail at the first matmul."""
    import torch

    layer = next((m for m in model.modules() if type(m).__name__ == "Linear4bit"), None)
    if layer is None:
        raise RuntimeError("no layer was quantised to 4 bits")
    with torch.no_grad():
        layer(torch.zeros(1, layer.in_features, device=layer.weight.device, dtype=layer.compute_dtype))


def wrap_lora(model: Any, r: int, alpha: int, dropout: float, lora_vision: bool) -> Any:
    """PEFT LoRA around the native model; the projector trains fully as a saved copy (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # unquantised fp16/bf16 weights to fp32, every base weight frozen; checkpointing is left to the memory
        # options (with checkpointing, enable_input_require_grads is needed: the embeddings are frozen)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=target_modules(lora_vision), modules_to_save=[PROJECTOR],
    )
    with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


def base_reference(name: str) -> str:
    """What adapter_config.json records as the base: an absolute folder, or the hub id."""
    model_id, _ = resolve_model_id(name)
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def save_adapter(model: Any, processor: Any, out_dir: Path, base: str) -> Path:
    """Adapter (PEFT format: adapter_model.safetensors + adapter_config.json) + processor + generation config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    native = model.get_base_model()
    clean_generation_config(native, processor)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base  # an absolute folder: the run folder reloads from anywhere
    model.save_pretrained(out_dir, safe_serialization=True)
    native.generation_config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def load_adapter_model(run_dir: Path, merge: bool = True, dtype: Any = None) -> tuple[Any, Any]:
    """(model, processor) from a LoRA/QLoRA run folder: the base in full precision + the adapter.

    A QLoRA adapter was trained on a 4-bit base; merging it into a 4-bit matrix would round the update
    away, so the base is loaded in full precision and the adapter merged into that (the standard QLoRA
    export; outputs differ from the 4-bit training model by the quantisation error only).
    """
    from peft import PeftModel
    from safetensors import SafetensorError
    from transformers import AutoProcessor

    from florence_kit.model.convert import convert_command, is_microsoft_adapter

    if is_microsoft_adapter(run_dir):
        raise UserError(
            f"'{run_dir}' is a LoRA adapter trained on Microsoft's remote-code Florence-2, whose module names the "
            f"native model does not have; convert it once: {convert_command(run_dir)} [--base CONVERTED_BASE]"
        )
    try:
        base = json.loads((run_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as exc:
        raise UserError(f"'{run_dir / ADAPTER_CONFIG}' is not valid JSON ({exc})") from None
    if not base:
        raise UserError(f"'{run_dir / ADAPTER_CONFIG}' does not name its base model (base_model_name_or_path)")
    try:
        model, processor = load_native(locate(base), base, dtype=dtype)
    except UserError as exc:
        raise UserError(f"cannot load the base model that '{run_dir / ADAPTER_CONFIG}' names: {exc}") from None
    if not (run_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"'{run_dir}' has no {ADAPTER_WEIGHTS}: the run did not finish saving, or the copy is partial")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(run_dir))
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise UserError(
            f"cannot load the adapter in '{run_dir}' onto its base '{base}' ({type(exc).__name__}: {first}); "
            "the adapter file is damaged, or the base is not the model it was trained on"
        ) from None
    if (run_dir / "preprocessor_config.json").is_file() or (run_dir / "processor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(run_dir))
    if (run_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.get_base_model().generation_config = GenerationConfig.from_pretrained(str(run_dir))
    return (model.merge_and_unload() if merge else model), processor


def default_optim(mode: str) -> str:
    """The mode's optimizer: AdamW, or where the modes table says 8-bit (qlora), paged 8-bit AdamW on CUDA and
    plain 8-bit AdamW elsewhere (paging is a CUDA unified-memory feature)."""
    import torch

    from florence_kit.model.modes import mode_row

    if not mode_row(mode).optim_8bit:
        return "adamw"
    return "paged-adamw8bit" if torch.cuda.is_available() else "adamw8bit"


def bnb_optimizer(groups: list[dict[str, Any]], lr: float, optim: str) -> Any:
    """bitsandbytes' 8-bit AdamW (optionally paged): optimizer state in 8 bits, a quarter of AdamW's."""
    require_bitsandbytes(f"--optim {optim}", "--optim adamw")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if optim == "paged-adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=lr)


@dataclass(frozen=True)
class AdapterOptions:
    """What the adapter checks read of a run's options (train/ builds it from its TrainConfig's same-named fields)."""

    mode: str
    lora_r: int
    lora_dropout: float
    lora_vision: bool
    optim: str | None  # None: the mode's default


def check_adapter_options(options: AdapterOptions) -> str:
    """Refuse option combinations that cannot run, before anything is loaded or written; returns the optimizer."""
    from florence_kit.model.modes import ADAPTER_MODES, mode_row

    if options.lora_vision and not mode_row(options.mode).adapters:
        raise UserError(f"--lora-vision needs --mode {' or '.join(ADAPTER_MODES)}")
    if options.lora_r < 1:
        raise UserError(f"--lora-r must be at least 1, got {options.lora_r}")
    if not 0.0 <= options.lora_dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {options.lora_dropout}")
    optim = options.optim or default_optim(options.mode)
    if optim not in OPTIMIZERS:
        raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got '{optim}'")
    if optim != "adamw":
        require_bitsandbytes(f"--optim {optim}", "--optim adamw")
    return optim
