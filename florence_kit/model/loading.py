"""``load_model``: the one way every command loads ``--model``, whatever kind of folder or id it names.

A native checkpoint (folder or hub id) loads as it is; a LoRA/QLoRA run folder loads its base plus the
adapter, merged, so evaluation and prediction see a plain Florence-2 model. A folder written by
``export --onnx`` runs in onnxruntime (:mod:`florence_kit.model.onnx_runtime`), answering like the PyTorch model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError, first_line
from florence_kit.model.adapters import load_adapter_model
from florence_kit.model.attention import set_attention
from florence_kit.model.checkpoint_io import is_adapter_dir, load_native, locate
from florence_kit.model.onnx_runtime import is_onnx_export, load_onnx_model, refuse_incomplete_export


def load_model(name: str, *, dtype: Any = None, quantization_config: Any = None) -> tuple[Any, Any]:
    """(model, processor) from a folder, hub id or short name; errors are one clear line."""
    if is_onnx_export(Path(name).expanduser()):
        if quantization_config is not None:
            raise UserError(f"'{name}' is an ONNX export; it cannot be quantised with bitsandbytes: "
                            "export it with --quantize int8 instead")
        return load_onnx_model(Path(name).expanduser())
    refuse_incomplete_export(Path(name).expanduser())
    model_id = locate(name)
    path = Path(model_id)
    if path.is_dir() and is_adapter_dir(path):
        if quantization_config is not None:
            raise UserError(f"'{path}' is a LoRA run folder; to quantise it, merge it first "
                            f"(florence-kit export {path} --merge OUT) and pass --model OUT")
        return load_adapter_model(path, dtype=dtype)
    return load_native(model_id, name, dtype=dtype, quantization_config=quantization_config)


def load_for_training(name: str) -> tuple[Any, Any]:
    """(model, processor) for ``finetune``: the weights in float32, whatever dtype the checkpoint was saved in.

    They are the optimizer's master copy: ``--precision bf16/fp16`` autocasts the forward pass around them. A
    16-bit checkpoint (hub Florence-2 weights are fp16) trained as it loads loses most AdamW updates to rounding
    (two steps at lr 1e-5 moved 15% of a converted fp16 model's weights, against 73% in float32), fp16 loss
    scaling refuses fp16 gradients, and transformers before 5.4 fed the fp16 vision tower float32 pixels
    (``Input type (float) and bias type (c10::Half) should be the same``).
    """
    import torch

    return load_model(name, dtype=torch.float32)


def load_for_generation(name: str, attn: str = "auto") -> tuple[Any, Any]:
    """(model, processor) for eval, predict and serve: on the GPU when there is one (``generate`` is the slow part
    of these commands and runs many times faster there), with the ``--attn`` kernel decided for that device.

    An ONNX export stays in onnxruntime on the CPU; a model bitsandbytes placed keeps its place. The dtype is the
    checkpoint's, so answers on the GPU are the CPU's up to kernel rounding. ``CUDA_VISIBLE_DEVICES=`` keeps a run
    on the CPU.
    """
    import torch

    model, processor = load_model(name)
    placed = getattr(model, "runs_onnx", False) or getattr(model, "hf_device_map", None) is not None \
        or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if torch.cuda.is_available() and not placed:
        model = model.to("cuda")
    set_attention(model, attn)
    return model, processor


def load_quantized(name: str) -> tuple[Any, Any]:
    """(4-bit NF4 model, processor) for ``qlora``, through :func:`load_model` (which refuses adapter folders and
    ONNX exports); a machine that cannot run 4-bit says what would work."""
    from florence_kit.model import adapters

    adapters.require_bitsandbytes("--mode qlora", "--mode lora")
    try:
        model, processor = load_model(name, quantization_config=adapters.quantization_config())
        adapters.own_unquantized_weights(model)
        adapters._try_4bit_forward(model)
        return model, processor
    except UserError:
        raise
    except (RuntimeError, ImportError, NotImplementedError, ValueError, AssertionError) as exc:
        first = first_line(exc)
        raise UserError(
            f"this machine cannot load the model in 4-bit NF4 for --mode qlora ({type(exc).__name__}: {first}); "
            "use --mode lora instead (add --optim adamw8bit to save optimizer memory)"
        ) from None
