"""``florence-kit plan TASK``: predicted peak memory per mode and the largest batch that fits a GPU."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from florence_kit.cli.common import TasksDirOption, console, user_errors
from florence_kit.model.memory import GPUS
from florence_kit.model.modes import ADAPTER_MODES, Mode, listing
from florence_kit.model.precision import Precision

# the cards the memory model knows (model/memory.GPUS), as Typer's choices
Gpu = Enum("Gpu", [(name.replace("-", "_"), name) for name in GPUS], type=str)  # type: ignore[misc]


@user_errors
def plan(
    task: Annotated[str, typer.Argument(help="Task name (its target length sets the decoder tokens).")],
    model: Annotated[str, typer.Option(help="base, large, or a checkpoint folder (only its config is read).")] = "base",
    gpu: Annotated[Gpu | None, typer.Option(help="Card to plan for; default: this machine (GPU, else RAM).")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Only this mode (default: every mode).")] = None,
    batch_size: Annotated[int, typer.Option(help="Effective batch to reach (micro-batch × accumulation).")] = 8,
    precision: Annotated[Precision, typer.Option(help="auto: bf16, fp16 on a T4, fp32 on CPU.")] = Precision.auto,
    image_size: Annotated[int | None, typer.Option(help="Image side; default: the model's processor's.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens besides the image tokens.")] = 32,
    target_tokens: Annotated[
        int | None, typer.Option(help="Target tokens; default: the task's max_new_tokens.")
    ] = None,
    lora_r: Annotated[int, typer.Option(help=f"LoRA rank assumed for {'/'.join(ADAPTER_MODES)}.")] = 16,
    lora_vision: Annotated[
        bool, typer.Option(help=f"{'/'.join(ADAPTER_MODES)} also adapt the vision tower (as finetune --lora-vision): "
                           "it keeps its activations for the backward.")
    ] = False,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Predict peak training memory per mode and pick batch × accumulation (+ checkpointing) that fits.

    Examples:

      florence-kit plan docvqa --model base --gpu t4

      florence-kit plan docvqa --model large --gpu a100-40 --mode lora --batch-size 32

      florence-kit plan docvqa --model base --gpu t4 --mode lora --lora-vision
    """
    from florence_kit.common.errors import UserError
    from florence_kit.model.memory import (
        GIB,
        MODES,
        Shape,
        gpu_budget,
        image_tokens,
        load_config,
        local_budget,
        model_image_size,
        plan_modes,
        sizes,
        with_positions,
    )
    from florence_kit.tasks.registry import get_task

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    for name, value, least in (("--image-size", image_size, 1), ("--target-tokens", target_tokens, 1),
                               ("--prompt-tokens", prompt_tokens, 0), ("--lora-r", lora_r, 1)):
        if value is not None and value < least:  # 0 must not fall back to the default, nor -64 plan nonsense
            raise UserError(f"{name} must be at least {least}, got {value}")
    if lora_vision and mode and mode.value not in ADAPTER_MODES:
        raise UserError(f"--lora-vision needs --mode {listing(ADAPTER_MODES)} (or no --mode)")
    spec = get_task(task, list(tasks_dir or []))
    target = target_tokens if target_tokens is not None else int(spec.generation.get("max_new_tokens", 64))
    config = with_positions(load_config(model), target)  # targets past the table: finetune --max-target-length
    s = sizes(config)
    side = image_size if image_size is not None else model_image_size(model)
    shape = Shape(side, prompt_tokens, target)
    budget = gpu_budget(gpu.value, precision.value) if gpu else local_budget(precision.value)
    if budget.device == "cpu" and budget.precision != "fp32":
        raise UserError("on CPU the planner models fp32 training only; drop --precision or pass --gpu")
    modes = (mode.value,) if mode else MODES
    fits = plan_modes(s, shape, budget, batch_size, modes, lora_r, lora_vision)

    prec = {"fp32": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}[budget.precision]
    console.print(
        f"Florence-2 {model} ({s.total / 1e6:,.0f} M parameters) on {budget.label}: "
        f"{budget.memory / GIB:.1f} GiB usable, {prec}", highlight=False, soft_wrap=True,
    )
    console.print(
        f"{spec.name} at {side}×{side}: {image_tokens(config, side)} image tokens + {prompt_tokens} prompt tokens, "
        f"{target} target tokens; effective batch {batch_size}", highlight=False, soft_wrap=True,
    )
    header = f"{'mode':<15} {'peak @ batch 1':>15} {'largest batch':>14} {'with checkpointing':>19}   --fit auto picks"
    console.print(header, highlight=False, soft_wrap=True)
    for f in fits:
        label = f.mode + ("+vision" if lora_vision and f.mode in ADAPTER_MODES else "")
        console.print(
            f"{label:<15} {f.peak_1 / GIB:>11.1f} GiB {f.max_batch:>14} {f.max_batch_ckpt:>19}   "
            f"{f.describe()}" + (f" (peak {f.peak / GIB:.1f} GiB)" if f.fits else ""),
            highlight=False, soft_wrap=True,
        )
    usable = [f for f in fits if f.fits]
    if not usable:
        raise UserError("no mode fits this memory; try --mode qlora, a smaller --image-size, or a larger GPU")
