"""``--strategy``: how several processes share a run: DDP (every process a whole copy) or FSDP2 (shards).

FSDP here is torch's FSDP2, ``torch.distributed.fsdp.fully_shard``, applied to every DaViT block and BART
encoder/decoder layer, then to the root: each process keeps 1/N of every parameter (a DTensor sharded on
its first dimension), of every gradient and of the AdamW state, and gathers a block's full weights only
while that block runs. It runs on CPU over gloo as on CUDA over nccl. Accelerate's own FSDP is not used:
it applies FSDP only on accelerators, and on a machine without CUDA its flags (``accelerate launch
--use_fsdp``, ``ACCELERATE_USE_FSDP``) would silently give DDP; here those flags ask for this FSDP2.

What differs from DDP, each in one place:
- the model is not given to ``accelerator.prepare`` (that would wrap it in DDP) and neither is the
  optimizer (its state is sharded: checkpoints gather and scatter it here, :func:`save_sharded` /
  :func:`load_sharded`);
- a frozen vision tower runs inside the root module's forward (its parameters have no gradient, so
  autograd keeps none of its activations either), not beside it as ``train/step.py`` does on one process;
- generation (``--eval-every``) and the final save need whole weights: they are gathered into a plain
  copy of the model on the main process (:func:`plain_model`).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Any

from florence_kit.common.errors import UserError

STRATEGIES = ("auto", "ddp", "fsdp")
VISION_BLOCK_CLASS = "Florence2VisionBlock"
OPTIMIZER_FILE = "optimizer.bin"  # the name Accelerate's save_state gives a prepared optimizer's state
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sharded model -> its plain copy (main process)


def launcher_asked_fsdp() -> bool:
    """``accelerate launch --use_fsdp`` sets ``ACCELERATE_USE_FSDP=true`` (and ``FSDP_*`` settings)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(requested: str) -> str:
    """``none`` (one process), ``ddp`` or ``fsdp``: what this launch runs, or one line saying why not.

    ``auto`` is DDP under several processes, unless the launcher asked for FSDP (``--use_fsdp``). When FSDP
    runs, ``ACCELERATE_USE_FSDP`` is removed from the environment: Accelerate must not wrap the model again.
    """
    if requested not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got '{requested}'")
    launcher = launcher_asked_fsdp()
    if launcher and requested == "ddp":
        raise UserError("the launcher asked for FSDP (accelerate launch --use_fsdp / ACCELERATE_USE_FSDP=true) "
                        "but --strategy is ddp; drop one of them")
    chosen = "fsdp" if launcher and requested == "auto" else requested
    if world_size() == 1:
        if chosen != "auto":
            asked = "FSDP (--use_fsdp)" if launcher else f"--strategy {chosen}"
            raise UserError(f"{asked} shares a run between processes, and this is one process: launch with "
                            "torchrun --nproc-per-node N or accelerate launch --num_processes N (N >= 2), or "
                            "leave --strategy at auto")
        return "none"
    if chosen == "fsdp":
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    return "ddp" if chosen == "auto" else chosen


def check_fsdp_options(cfg: Any, precision: str) -> None:
    """What FSDP here does not run, refused before anything is loaded: one line each, saying what to do."""
    from florence_kit.model.modes import ADAPTER_MODES, TABLE, listing

    if cfg.mode in ADAPTER_MODES:
        raise UserError(f"--strategy fsdp trains --mode {listing(n for n in TABLE if n not in ADAPTER_MODES)}; "
                        f"a {cfg.mode} run's trainable adapter is small: launch it with DDP (--strategy ddp or auto)")
    if cfg.cache_vision_features:
        raise UserError("--cache-vision-features runs the frozen vision tower outside the sharded model; under "
                        "--strategy fsdp the tower runs inside it: drop --cache-vision-features or use DDP")
    if cfg.compile:
        raise UserError("--compile is not supported with --strategy fsdp; drop one of them")
    if precision == "fp16":
        raise UserError("--strategy fsdp runs in bf16 or fp32 (fp16 loss scaling of sharded gradients is not "
                        "supported here): pass --precision bf16 or fp32")


def blocks(model: Any) -> list[Any]:
    """The units sharded on their own: every DaViT block and BART encoder/decoder layer, in model order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules()
            if type(m).__name__ == VISION_BLOCK_CLASS or isinstance(m, GradientCheckpointingLayer)]


def shard(model: Any, device: Any) -> Any:
    """FSDP2 on every block, then the root (embeddings, projector, norms, the tied LM head): in place.

    Keeps a parameterless skeleton of the model on the main process (on the meta device), which
    :func:`plain_model` fills with gathered weights when generation or saving needs a whole model.
    """
    import copy

    from torch.distributed.fsdp import fully_shard

    from florence_kit.model.modes import unwrap

    # a DaViT block returns a transposed view; FSDP2 warns in case a later op changes it in place, which
    # Florence-2 never does (the 2-process == 1-process weight test checks the gradients it would break)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    model = unwrap(model)
    if int(os.environ.get("RANK", "0")) == 0:
        skeleton = copy.deepcopy(model).to("meta")  # the structure and buffers' shapes, no memory
        from florence_kit.model.activation_checkpointing import disable_gradient_checkpointing, vision_blocks

        if any(getattr(b.forward, "florence_kit_checkpointed", False) for b in vision_blocks(skeleton)):
            # the copied DaViT blocks' checkpointed forwards would call the original (sharded) blocks
            disable_gradient_checkpointing(skeleton)
        _PLAIN[model] = [skeleton, False]
    model.to(device)
    mesh = None
    if device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    from florence_kit.model.modes import unwrap

    return isinstance(unwrap(model), FSDPModule)


def full_tensors(model: Any, only_trainable: bool = False) -> dict[str, Any]:
    """Every (trainable) parameter whole, by its name in the plain model; on the main process only (empty
    elsewhere). Collective: every process calls it, in the same order."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    main = dist.get_rank() == 0
    out = {}
    for name, param in model.named_parameters():
        if only_trainable and not param.requires_grad:
            continue
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        if main:
            out[name] = whole.detach().cpu().contiguous()
    return out


def plain_model(model: Any) -> Any:
    """The model with whole weights on the main process (None on the others); ``model`` itself when unsharded.

    Under FSDP: every process takes part in gathering the weights into the main process's plain copy (on
    CPU; it stays there between calls, so a later call costs the gather only).
    """
    import torch

    from florence_kit.model.modes import unwrap

    if not is_sharded(model):
        return model
    inner = unwrap(model)
    weights = full_tensors(inner)
    if inner not in _PLAIN:
        return None
    entry = _PLAIN[inner]
    plain, filled = entry
    if not filled:
        plain.to_empty(device="cpu")
        buffers = dict(inner.named_buffers())
        with torch.no_grad():
            for name, buffer in plain.named_buffers():
                buffer.copy_(buffers[name].detach().cpu())
        entry[1] = True
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    if plain.config.tie_word_embeddings:
        plain.tie_weights()
    plain.eval()
    return plain


def shares(model: Any, optimizer: Any) -> list[dict[str, int]]:
    """Each process's share of the parameters, gradients and optimizer state: elements held / total.

    Collective (an all-gather of four numbers per process); call it while gradients exist (before zero_grad).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    def held(tensor: Any) -> tuple[int, int]:
        if isinstance(tensor, DTensor):
            return tensor.to_local().numel(), tensor.numel()
        return tensor.numel(), tensor.numel()

    counts = dict.fromkeys(("params_local", "params_total", "grads_local", "grads_total",
                            "optimizer_local", "optimizer_total"), 0)
    for param in model.parameters():
        local, total = held(param)
        counts["params_local"] += local
        counts["params_total"] += total
        if param.grad is not None:
            local, total = held(param.grad)
            counts["grads_local"] += local
            counts["grads_total"] += total
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:  # AdamW's moments, not its step counter
                local, total = held(value)
                counts["optimizer_local"] += local
                counts["optimizer_total"] += total
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [counts]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    return gathered


def strategy_line(strategy: str, backend: str, ranks: list[dict[str, int]], launcher: bool = False) -> str:
    """The one line a run prints about how it is distributed (``launcher``: asked by ``--use_fsdp``)."""
    if strategy == "none":
        return "strategy: none (one process)"

    def pct(a: int, b: int) -> str:
        return f"{100 * a / b:.1f}%" if b else "-"

    held = "; ".join(
        f"rank {i} holds {r['params_local']:,}/{r['params_total']:,} parameter elements "
        f"({pct(r['params_local'], r['params_total'])}), optimizer state "
        f"{pct(r['optimizer_local'], r['optimizer_total'])}"
        for i, r in enumerate(ranks))
    what = "FSDP2, sharded per block" if strategy == "fsdp" else "DDP, a whole copy per process"
    asked = "; asked by accelerate launch --use_fsdp, whose --fsdp_* settings are not used" if launcher else ""
    return f"strategy: {strategy} ({what}; {len(ranks)} processes over {backend}{asked}): {held}"


def optimizer_to_file(model: Any, optimizer: Any) -> dict[str, Any]:
    """The whole optimizer state on the main process, keyed as a one-process ``optimizer.state_dict()`` is
    (parameters numbered in group order), so the file reads like any other run's. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if not full:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in full["param_groups"]:
        numbered = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            numbered.append(index[name])
        groups.append({**group, "params": numbered})
    return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def optimizer_from_file(model: Any, optimizer: Any, saved: dict[str, Any]) -> None:
    """:func:`optimizer_to_file`'s dict put back into the sharded optimizer (each process takes its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    keyed = {
        "state": {order[int(i)]: value for i, value in saved["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=keyed,
                             options=StateDictOptions(full_state_dict=True))


def save_sharded(model: Any, optimizer: Any, folder: Any, weights_file: str) -> None:
    """The trainable weights whole (``model.safetensors``, as an unsharded run writes it) and the optimizer's
    whole state (``optimizer.bin``), written by the main process. Collective."""
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from florence_kit.model.modes import unwrap

    inner = unwrap(model)
    weights = full_tensors(inner, only_trainable=True)
    state = optimizer_to_file(inner, optimizer)
    if dist.get_rank() == 0:
        save_file(weights, str(Path(folder) / weights_file), metadata={"format": "pt"})
        torch.save(state, Path(folder) / OPTIMIZER_FILE)


def load_sharded(model: Any, optimizer: Any, folder: Any, weights_file: str) -> None:
    """:func:`save_sharded`'s files read back into the sharded model and optimizer (each process its shard)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from florence_kit.model.modes import unwrap

    inner = unwrap(model)
    saved = load_file(str(Path(folder) / weights_file))
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    if set(saved) != trainable:
        raise UserError(
            f"checkpoint '{folder}' holds {len(saved)} trainable tensors but this run trains {len(trainable)}: "
            "it was written with another --mode or model; resume with the same settings"
        )
    set_model_state_dict(inner, saved, options=StateDictOptions(full_state_dict=True, strict=False))
    optimizer_from_file(inner, optimizer, torch.load(Path(folder) / OPTIMIZER_FILE, weights_only=False))
