"""One training configuration in this (fresh) process: print its peak memory as JSON.

Run by :mod:`benchmarks.memory` in a subprocess per configuration, with glibc's mmap threshold fixed
so that freed tensors go back to the OS and the resident set follows live memory. On CPU the peak is
the process's high-water mark (VmHWM) minus its resident size after the imports, before the model is
built; on CUDA it is ``torch.cuda.max_memory_reserved`` plus the CUDA context (device memory in use that torch's
allocator does not hold, read from ``cudaMemGetInfo``), since that is what a card's budget must hold.
``precision`` (bf16/fp16, CUDA only) autocasts the forward as Accelerate does; fp16 adds a loss scaler.
Usage: python -m benchmarks._measure '{"model": "base", "mode": "full", "batch": 1, ...}'
"""

from __future__ import annotations

import json
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build(model_name: str, mode: str, lora_r: int, cuda: bool = False, lora_vision: bool = False) -> tuple:
    """(model, frozen_vision) built from a config with random weights, mode applied as train.py does."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.memory import load_config

    config = load_config(model_name)
    torch.manual_seed(0)
    model = _quantized(config, cuda) if mode == "qlora" else Florence2ForConditionalGeneration(config)
    if mode in ("lora", "qlora"):
        model = _wrap_lora(model, lora_r, lora_vision)
    from florence_kit.model.modes import Mode, apply_mode, frozen_components

    if mode in {m.value for m in Mode}:
        apply_mode(model, mode, lora_vision)
        return model, "vision" in frozen_components(mode, lora_vision)
    # lora/qlora before florence_kit.model.modes knows them: adapters and the projector copy train, nothing else
    for name, param in model.named_parameters():
        trains = "lora_" in name or ("multi_modal_projector" in name and "original_module" not in name)
        param.requires_grad_(trains and param.is_floating_point())
    return model, True


def _wrap_lora(model, r: int, lora_vision: bool = False):
    """The adapters a user's ``--mode lora`` run trains (florence_kit.model.adapters.wrap_lora)."""
    from florence_kit.model.adapters import wrap_lora

    return wrap_lora(model, r=r, alpha=2 * r, dropout=0.05, lora_vision=lora_vision)


def _quantized(config, cuda: bool = False):
    """4-bit NF4 Linear layers (bitsandbytes) in place of the language model's Linear layers."""
    import tempfile

    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.adapters import own_unquantized_weights, quantization_config

    with tempfile.TemporaryDirectory() as tmp:
        Florence2ForConditionalGeneration(config).save_pretrained(tmp)
        if not cuda:  # a user's run starts from a checkpoint: writing this one (fp32 model built) is not measured
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
        quant = quantization_config()  # what a user's qlora run loads with (compute dtype follows the device)
        placement = {"device_map": {"": 0}} if cuda else {}  # quantised while moved to the GPU, as a user's run
        model = Florence2ForConditionalGeneration.from_pretrained(tmp, quantization_config=quant, **placement)
        own_unquantized_weights(model)  # as florence_kit.model.loading.load_quantized: the checkpoint is unmapped
        return model


def batch_for(config, batch: int, image_size: int, prompt: int, target: int) -> dict:
    import torch

    from florence_kit.model.memory import image_tokens

    n_img = image_tokens(config, image_size)
    ids = torch.randint(5, 1000, (batch, n_img + prompt + 2))
    ids[ids == config.image_token_id] = 4  # a random text token must not be an image token (tiny: id 261)
    ids[:, 1 : n_img + 1] = config.image_token_id
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch, 3, image_size, image_size),
        "labels": torch.randint(5, 1000, (batch, target)),
    }


def main(spec: dict) -> dict:
    import torch

    from florence_kit.model.activation_checkpointing import enable_gradient_checkpointing
    from florence_kit.train.step import forward_loss, make_optimizer

    torch.set_num_threads(spec.get("threads", 2))
    cuda = spec.get("device") == "cuda"
    from transformers import Florence2ForConditionalGeneration  # noqa: F401  (the model's code: ~120 MB of
    # imports, which peft pulls in too; in the baseline for every mode, so that no mode counts them as training)
    if spec["mode"] in ("lora", "qlora"):  # imports belong to the baseline, as for the other modes
        import peft  # noqa: F401

        import florence_kit.model.adapters  # noqa: F401
    if spec["mode"] == "qlora":
        import bitsandbytes  # noqa: F401
    base = _status("VmRSS")
    model, frozen_vision = build(spec["model"], spec["mode"], spec.get("lora_r", 16), cuda,
                                 bool(spec.get("lora_vision")))
    # PEFT injects the adapters into the native model's modules: train through the native model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cuda:
        model.cuda()
    if spec.get("checkpointing"):
        enable_gradient_checkpointing(model)
    model.train()
    if frozen_vision:
        from florence_kit.model.modes import component

        component(model, "vision").eval()
    optim = spec.get("optim", "adamw")
    if optim in ("adamw8bit", "paged-adamw8bit"):
        import bitsandbytes as bnb

        kind = bnb.optim.PagedAdamW8bit if optim.startswith("paged") else bnb.optim.AdamW8bit
        optimizer = kind([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    else:
        optimizer = make_optimizer(model, 1e-5, 0.0)
    data = batch_for(model.config, spec["batch"], spec["image_size"], spec["prompt"], spec["target"])
    if cuda:
        data = {k: v.cuda() for k, v in data.items()}
    precision = spec.get("precision", "fp32") if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    for _ in range(spec.get("steps", 2)):  # two steps: the second runs with the optimizer state allocated
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = forward_loss(model, data, frozen_vision)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if not cuda:
        return {**spec, "measured": _status("VmHWM") - base, "loss": float(loss.detach())}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    context = (total - free) - torch.cuda.memory_reserved()  # the CUDA context, kernels, cuBLAS workspace
    return {**spec, "measured": torch.cuda.max_memory_reserved() + context, "context": context,
            "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "loss": float(loss.detach()), "gpu": torch.cuda.get_device_name()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
