"""Accelerate, set up for florence-kit: devices, mixed precision, DDP on CPU or GPU, and what a resume must share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from florence_kit.train.config import TrainConfig


def multi_process_cpu() -> bool:
    """Started by torchrun / accelerate launch on a machine without CUDA.

    Accelerate joins a gloo process group on CPU only when told ``cpu=True``; without it each process
    would silently train its own copy of the model.
    """
    import os

    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(precision: str, **kwargs: Any) -> Any:
    """Accelerate does devices, autocast, loss scaling and DDP; we step the scheduler ourselves.

    ``step_scheduler_with_optimizer=False``: Accelerate would otherwise step the schedule once per
    process per step, and a 2-process run would decay its learning rate twice as fast as a 1-process run.
    """
    from accelerate import Accelerator

    from florence_kit.model.precision import ACCELERATE_NAME, device_facts, resolve_precision

    chosen = resolve_precision(precision, device_facts())
    return Accelerator(
        mixed_precision=ACCELERATE_NAME[chosen], step_scheduler_with_optimizer=False, cpu=multi_process_cpu(),
        **kwargs,
    )


def run_fingerprint(cfg: TrainConfig, accelerator: Any) -> dict[str, Any]:
    """Settings a resume must share with the run that wrote the checkpoint (data order, shapes, precision).

    Also those a resume would silently drop or reinterpret: the optimizer's and scheduler's saved states
    bring back the old learning rate and weight decay, and ``lora_alpha`` rescales every saved adapter update.
    --max-steps / --epochs may change: a finished run can be extended.
    """
    from florence_kit.model.modes import learning_rate
    from florence_kit.train.checkpoints import normal_source

    return {  # a local --model / --dataset resolved: the same folder, typed relative or absolute, is the same run
        "task": cfg.task, "model": normal_source(cfg.model), "dataset": normal_source(cfg.dataset),
        "mode": cfg.mode, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_samples": cfg.max_samples,
        "too_long": cfg.too_long, "lora_r": cfg.lora_r, "lora_vision": cfg.lora_vision, "optim": cfg.optim,
        "mix_weights": cfg.mix_weights, "processes": accelerator.num_processes,
        "mixed_precision": str(accelerator.mixed_precision),
        # the sampler: another grouping deals the epoch's rest in another order (None for plain shuffling,
        # so a checkpoint written before this key existed still resumes a plain run)
        "data_order": "image" if cfg.group_by_image else "length" if cfg.group_by_length else None,
        # the optimizer and schedule: Accelerate restores the saved rate and weight decay into the optimizer,
        # so a changed --lr or --weight-decay would be ignored without a word
        "lr": learning_rate(cfg.lr, cfg.mode), "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
        "warmup_steps": cfg.warmup_steps, "lora_alpha": cfg.lora_alpha,
    }


@contextmanager
def accelerator_trackers_closed(accelerator: Any) -> Iterator[None]:
    """Trackers flush and close even when the loop stops early (Ctrl-C, an error).

    Not ``accelerator.end_training()``: that also destroys the distributed process group, which the
    code after the loop (``wait_for_everyone``, saving) still needs.
    """
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
