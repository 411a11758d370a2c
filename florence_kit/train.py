"""The one training loop, on Accelerate: setup → preflight → train → save.

Read it top to bottom: the run folder is checked, the task's data is loaded and length-checked,
the mode decides which parameters train, AdamW + a warmup schedule step through the batches
(Accelerate handles devices, mixed precision and DDP), and the final model, processor, resolved
config and metrics log land in the output folder. Along the way: a step whose loss is NaN/inf is
skipped, checkpoints are written every ``--save-every`` steps (checkpoints.py) and a run resumes from
one exactly, and ``--eval-every`` keeps the best model and stops early.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from florence_kit.checkpoints import TrainState
from florence_kit.errors import UserError

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    """Every option of a fine-tuning run; written to ``config.yaml`` in the run folder."""

    task: str
    model: str
    output_dir: Path
    dataset: str | None = None
    mode: str = "full"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: the mode's default (modes.DEFAULT_LR)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    too_long: str = "drop"
    max_samples: int | None = None
    num_workers: int = 0
    log_every: int = 10
    overwrite: bool = False
    tasks_dirs: list[Path] = field(default_factory=list)
    # --- tasks ---
    streaming: bool = False
    mix_weights: str | None = None
    # --- lora ---
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_vision: bool = False
    optim: str | None = None  # adamw | adamw8bit | paged-adamw8bit; None: adamw (qlora: 8-bit, paged on CUDA)
    # --- trainspeed ---
    cache_vision_features: bool = False
    vision_cache_dir: Path | None = None  # None: <output_dir>/vision_cache
    prepare_data: bool = False  # decode/resize each distinct image once, tokenise once (florence_kit/prepared.py)
    prepare_dir: Path | None = None  # None: <output_dir>/prepared
    group_by_image: bool = False  # a page's questions in one batch (with --cache-vision-features: one DaViT pass)
    group_by_length: bool = False  # batches of similar length (needs --prepare-data)
    compile: bool = False  # regional torch.compile of the DaViT blocks and BART layers (florence_kit/compiling.py)
    # --- run folder ---
    report_to: str = "none"
    push_to_hub: str | None = None
    skip_bad_images: bool = False
    # --- runtime ---
    precision: str = "auto"
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    eval_every: int = 0
    eval_max_samples: int | None = 200
    early_stopping_patience: int = 0
    # --- memory ---
    gradient_checkpointing: bool = False  # BART layers (transformers) + DaViT blocks (florence_kit.checkpointing)
    fit: str = "off"  # off | auto: micro-batch, accumulation and checkpointing from florence_kit.memory
    # --- regions ---
    box_format: str | None = None  # region tasks: how the data writes boxes (None: the task's own)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    seconds: float
    dropped: int
    trainable: dict[str, tuple[int, int]]
    state: TrainState = field(default_factory=TrainState)
    start_step: int = 0  # the checkpoint's step a resumed run started from: ``seconds`` timed the steps after it


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Never write over an earlier run by accident."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        from florence_kit.runfolder import describe_output_dir

        raise UserError(describe_output_dir(out))


# Options about the command and its output folder, not the training: config.yaml records them under ``run``
PER_COMMAND: dict[str, Any] = {"resume": None, "overwrite": False}


def write_config(cfg: TrainConfig, out: Path, extra: dict[str, Any]) -> None:
    """Every resolved option at the top level (``--config`` reads it back), then ``versions`` and ``run``.

    ``run`` records facts about this run (task origin, example counts, ``--resume``/``--overwrite`` if
    given, the git commit of the working directory); ``versions`` the libraries and florence-kit's own
    commit. ``--config`` ignores both.
    """
    import yaml

    from florence_kit.runconfig import options_dict
    from florence_kit.versions import git_commit, versions

    data = options_dict(cfg)
    given = {k: data[k] for k, default in PER_COMMAND.items() if data[k] != default}
    data.update(PER_COMMAND)  # --config RUN/config.yaml --output-dir NEW must not resume or overwrite anything
    data.update(versions=versions(), run={**extra, **given, "git_commit": git_commit(Path.cwd())})
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(out / "config.yaml")


def forward_loss(
    model: Any, batch: dict[str, Any], frozen_vision: bool, num_items: Any = None, feature_cache: Any = None
) -> Any:
    """Loss of one batch. With the vision tower frozen, it runs under ``no_grad``: no activations kept.

    ``num_items``: the loss is summed over target tokens and divided by this count (transformers'
    ``num_items_in_batch``) instead of averaged over this batch's own tokens.
    ``feature_cache`` (a :class:`florence_kit.feature_cache.VisionFeatureCache`) serves the frozen tower's
    output for images seen before, so DaViT runs once per distinct image.
    """
    import torch

    from florence_kit.modes import unwrap

    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    if not frozen_vision:
        return model(**batch, **extra).loss
    inner = unwrap(getattr(model, "module", model)).model
    if feature_cache is not None:  # --- trainspeed: vision-feature cache ---
        features = feature_cache.features(inner.vision_tower, batch["pixel_values"])
    else:
        with torch.no_grad():
            features = inner.vision_tower(batch["pixel_values"]).last_hidden_state
    image_features = inner.multi_modal_projector(features)
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask = (batch["input_ids"] == inner.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"], **extra).loss


def make_optimizer(model: Any, lr: float, weight_decay: float, optim: str = "adamw") -> Any:
    """AdamW over trainable parameters only (frozen ones get no optimizer state); no decay on norms/biases.

    ``adamw8bit``/``paged-adamw8bit``: bitsandbytes' 8-bit AdamW (see florence_kit/adapters.py).
    """
    import torch

    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim != "adamw":
        from florence_kit.adapters import OPTIMIZERS, bnb_optimizer

        if optim not in OPTIMIZERS:
            raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got '{optim}'")
        return bnb_optimizer([g for g in groups if g["params"]], lr, optim)
    # foreach: one fused update over all tensors; torch only picks it by default on CUDA
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, foreach=True)


def warmup_schedule(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then linear or cosine decay to 0 (or constant).

    Written out (ten lines) instead of importing transformers' ``get_scheduler``, whose import chain
    (trainer utilities, peft, bitsandbytes) costs seconds on every run.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return factor


NONFINITE_LIMIT = 5  # consecutive non-finite losses before the run stops


class EpochShuffle:
    """A sampler whose order is a function of (seed, epoch) alone.

    A resumed run rebuilds any epoch's order without having iterated the earlier ones, and under DDP
    every process draws the same permutation, which Accelerate then deals out batch by batch: the global
    batch of N processes x B equals a single process's batch of N*B. The order is the one
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives in its e-th epoch
    (each epoch draws a worker base seed and a permutation from that generator, and torch's
    RandomSampler draws one more permutation as it finishes), which the loop used before it could
    resume: the demo's measured results were made with it.
    """

    def __init__(self, size: int, seed: int, draws: Callable[[int], list[int]] | None = None) -> None:
        self.size, self.seed, self.epoch, self.draws = size, seed, 0, draws

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base-seed draw
            order = torch.randperm(self.size, generator=generator)
            torch.randperm(self.size, generator=generator)  # RandomSampler's empty remainder permutation
        return iter(drawn(order.tolist(), self.draws, self.epoch))


def drawn(order: list[int], draws: Callable[[int], list[int]] | None, epoch: int) -> list[int]:
    """A sampler's shuffled slots as positions: a weighted mix's slots are the epoch's draws
    (:class:`florence_kit.mixing.MixDraws`), any other's the positions themselves."""
    if draws is None:
        return order
    epoch_draws = draws(epoch)
    return [epoch_draws[i] for i in order]


def mix_draws(rows: Any, dataset: Any) -> Callable[[int], list[int]] | None:
    """The per-epoch draws of a weighted mix over ``dataset``'s positions (None: each position once an epoch).

    ``rows`` are the training rows before ``--prepare-data``: an ImageGuard, whose ``dataset`` may be the mix;
    ``dataset`` is what the loader reads, whose ``indices`` are the mix positions it kept.
    """
    mixed = getattr(rows, "dataset", rows)
    if not hasattr(mixed, "draws"):
        return None
    return mixed.draws(list(getattr(dataset, "indices", range(len(dataset)))))


def training_image_keys(dataset: Any) -> list[str]:
    """One image key per training position. The loop trains on an ImageGuard (kept rows of the examples):
    its positions are ``indices`` into the examples, which alone know their images."""
    from florence_kit.prepared import image_keys

    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        keys = image_keys(dataset.dataset)
        return [keys[i] for i in dataset.indices]
    return image_keys(dataset)


def make_sampler(dataset: Any, cfg: TrainConfig, draws: Callable[[int], list[int]] | None = None) -> Any:
    """The epoch order: a plain shuffle, or grouped by page (``--group-by-image``) or length (``--group-by-length``);
    of a weighted mix's ``draws`` for the epoch, where given."""
    if cfg.group_by_image and cfg.group_by_length:
        raise UserError("choose one of --group-by-image and --group-by-length")
    if cfg.group_by_length:
        from florence_kit.prepared import LengthGroups

        if not hasattr(dataset, "lengths"):
            raise UserError("--group-by-length needs --prepare-data (the lengths come from its tokenisation)")
        return LengthGroups(dataset.lengths(), cfg.batch_size, cfg.seed, draws=draws)
    if cfg.group_by_image:
        from florence_kit.prepared import PageGroups

        if hasattr(dataset, "image_of"):
            return PageGroups(dataset.image_of(), cfg.seed, draws=draws)
        keys = training_image_keys(dataset)
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return PageGroups([index[k] for k in keys], cfg.seed, draws=draws)
    return EpochShuffle(len(dataset), cfg.seed, draws)


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

    from florence_kit.precision import ACCELERATE_NAME, device_facts, resolve_precision

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
    from florence_kit.checkpoints import normal_source
    from florence_kit.modes import learning_rate

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


def train_loop(
    model: Any,
    processor: Any,
    dataset: Any,
    cfg: TrainConfig,
    log_path: Path,
    on_step: Callable[[int, int, float, float], None] | None = None,
    collate_truncate: bool = False,
    *,
    evaluator: Callable[[Any], tuple[str, float]] | None = None,
    on_best: Callable[[Any, int, float], None] | None = None,
    resume_from: Path | None = None,
    state: TrainState | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> tuple[int, float]:
    """Train ``model`` in place on ``dataset`` (examples); returns (optimizer steps, last loss).

    ``evaluator(unwrapped_model) -> (metric name, value)`` runs on the main process every ``cfg.eval_every``
    steps, and ``on_best(unwrapped_model, step, value)`` when the value improved (up, or down for a metric
    registered ``higher_is_better=False`` such as CER);
    ``resume_from`` is a checkpoint folder; pass ``state`` to read the run's counters afterwards.
    ``stop_requested()`` (Ctrl-C seen) is asked after every step; under DDP the processes agree on it, so
    all of them stop after the same step and :class:`~florence_kit.runfolder.StepInterrupt` is raised on each.
    """
    import torch
    from accelerate.utils import broadcast_object_list, set_seed
    from torch.utils.data import DataLoader

    from florence_kit import checkpoints
    from florence_kit.adapters import default_optim
    from florence_kit.collate import IGNORE_INDEX, Collator, max_positions
    from florence_kit.modes import apply_mode, component, frozen_components, learning_rate
    from florence_kit.runfolder import StepInterrupt

    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    from florence_kit import trackers  # --- run folder: trackers ---

    accelerator = make_accelerator(cfg.precision, **trackers.accelerator_kwargs(cfg.report_to, cfg.output_dir))
    trackers.start(accelerator, cfg.report_to, asdict(cfg), cfg.output_dir)
    if accelerator.distributed_type == "FSDP" and (evaluator or cfg.mode != "full"):
        raise UserError(  # generation runs on the main process only; the frozen tower is called outside FSDP's root
            "under FSDP use --mode full without --eval-every (evaluate the saved model with `florence-kit eval`), "
            "or launch DDP instead"
        )
    set_seed(cfg.seed)
    apply_mode(model, cfg.mode, cfg.lora_vision)
    if cfg.gradient_checkpointing:
        from florence_kit.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if cfg.compile:  # --- trainspeed ---
        from florence_kit.compiling import compile_regions

        compile_regions(model)
    frozen_vision = "vision" in frozen_components(cfg.mode, cfg.lora_vision)
    optimizer = make_optimizer(model, learning_rate(cfg.lr, cfg.mode), cfg.weight_decay,
                               cfg.optim or default_optim(cfg.mode))
    collator: Any = Collator(processor, max_length=max_positions(model.config), truncate=collate_truncate)
    normalizer: Any = None  # --prepare-data: uint8 pixels arrive and are normalised here (PixelNormalizer)
    rows = dataset  # before --prepare-data: a weighted mix's draws are found through its rows
    if cfg.prepare_data:  # --- trainspeed: decode and resize once, tokenise once ---
        from florence_kit.prepared import prepare_training_data

        where = cfg.prepare_dir or Path(cfg.output_dir) / "prepared"
        with accelerator.main_process_first():  # one store: the main process fills it, the others read it back
            dataset, collator, normalizer = prepare_training_data(
                dataset, processor, where, workers=cfg.num_workers, max_length=max_positions(model.config),
                truncate=collate_truncate, print_fn=print if accelerator.is_main_process else None,
            )
    elif getattr(dataset, "skip", False):  # --skip-bad-images: the rows --prepare-data would leave out
        dataset.leave_out_unreadable(workers=cfg.num_workers)
    sampler = make_sampler(dataset, cfg, mix_draws(rows, dataset))
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator, num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: the host-to-GPU copy runs asynchronously
        generator=torch.Generator().manual_seed(cfg.seed),  # worker seeds from here, not from the global RNG
    )
    loader = accelerator.prepare(loader)  # first: its per-process length sets the schedule
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(cfg.schedule, cfg.warmup_steps, total))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    checkpoints.install_hooks(accelerator)
    fingerprint = run_fingerprint(cfg, accelerator)
    state = state if state is not None else TrainState()
    if resume_from is not None:
        vars(state).update(vars(checkpoints.load(accelerator, resume_from, fingerprint)))

    feature_cache = None
    if cfg.cache_vision_features:  # --- trainspeed: vision-feature cache ---
        from florence_kit.feature_cache import VisionFeatureCache

        if not frozen_vision:
            raise UserError("--cache-vision-features needs a frozen vision tower: use --mode frozen-encoder, "
                            "lora or qlora (without --lora-vision)")
        cache_root = cfg.vision_cache_dir or Path(cfg.output_dir) / "vision_cache"
        feature_cache = VisionFeatureCache(cache_root, component(accelerator.unwrap_model(model), "vision"),
                                           compute=str(accelerator.mixed_precision))

    def set_train_mode() -> None:
        model.train()
        if frozen_vision:  # no dropout / drop-path in a frozen tower: it must behave as at inference
            component(accelerator.unwrap_model(model), "vision").eval()

    def train_step(group: list[dict[str, Any]]) -> float:
        """One optimizer step over ``group`` (its micro-batches); returns the step's mean token loss.

        The loss is summed over target tokens and divided by the count of the whole global batch (all
        micro-batches, all processes), so accumulation and DDP average exactly as one big batch would.
        """
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group)
        tokens = accelerator.reduce(torch.tensor(float(local), device=accelerator.device), "sum")
        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(group):
            if normalizer is not None:
                batch = {**batch, "pixel_values": normalizer(batch["pixel_values"])}
            sync = accelerator.no_sync(model) if i < len(group) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss = forward_loss(model, batch, frozen_vision, num_items=tokens, feature_cache=feature_cache)
                loss = loss * accelerator.num_processes
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        mean_loss = float(accelerator.reduce(loss_sum, "sum")) / accelerator.num_processes
        if not math.isfinite(mean_loss):  # the same verdict on every process: the reduced loss is shared
            optimizer.zero_grad(set_to_none=True)
            return mean_loss
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps whose gradients overflowed
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def write(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if numbers:  # --- run folder: trackers --- (a no-op without --report-to)
            accelerator.log(numbers, step=record["step"])

    def record(loss: float, lr: float) -> None:
        """Log the step; count a non-finite loss, and stop after NONFINITE_LIMIT in a row."""
        if math.isfinite(loss):
            state.nonfinite_in_a_row = 0
            if state.step % cfg.log_every == 0 or state.step == total or state.step == 1:
                write({"step": state.step, "loss": round(loss, 6), "lr": lr,
                       "samples": state.step * cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
                       "elapsed_s": round(time.perf_counter() - start, 3)})
            return
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        write({"step": state.step, "loss": None, "skipped": "non-finite loss",
               "nonfinite_steps": state.nonfinite_steps})
        if state.nonfinite_in_a_row >= NONFINITE_LIMIT:
            raise UserError(
                f"training stopped at step {state.step}: the loss was NaN/inf in {NONFINITE_LIMIT} consecutive "
                "steps (their updates were skipped); lower --lr, use --precision fp32 or bf16 instead of fp16, "
                "or check the data"
            )

    def stop_agreed(requested: bool) -> bool:
        """Any process asking to stop stops all of them after this step (a SIGINT reaches each on its own time:
        one stopping alone would leave the others waiting in the next step's gradient all-reduce)."""
        if accelerator.num_processes == 1:
            return requested
        votes = accelerator.reduce(torch.tensor(float(requested), device=accelerator.device), "sum")
        return float(votes) > 0

    def run_eval() -> None:
        """Score on the main process, share the score, keep the best model, and decide on early stopping."""
        assert evaluator is not None
        result = [evaluator(accelerator.unwrap_model(model)) if accelerator.is_main_process else None]
        name, value = broadcast_object_list(result)[0] if accelerator.num_processes > 1 else result[0]
        set_train_mode()
        from florence_kit.metrics import get_metric

        better = (lambda a, b: a > b) if get_metric(name).higher_is_better else (lambda a, b: a < b)
        improved = state.best_metric is None or better(value, state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.evals_since_best = value, state.step, 0
            if on_best is not None and accelerator.is_main_process:
                on_best(accelerator.unwrap_model(model), state.step, value)
        else:
            state.evals_since_best += 1
        write({"step": state.step, f"eval/{name}": value, "best": state.best_metric, "best_step": state.best_step})
        if cfg.early_stopping_patience and state.evals_since_best >= cfg.early_stopping_patience:
            state.stopped_early = True
            write({"step": state.step, "event": "early stopping", "evals_without_improvement": state.evals_since_best})
        accelerator.wait_for_everyone()

    set_train_mode()
    last_loss, start = float("nan"), time.perf_counter() - state.elapsed_s  # a resume goes on counting
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(log_path.open("a")) if accelerator.is_main_process else None
        stack.enter_context(accelerator_trackers_closed(accelerator))
        while state.step < total and not state.stopped_early:  # one pass per epoch
            sampler.set_epoch(state.epoch)
            epoch_loader = accelerator.skip_first_batches(loader, state.batch) if state.batch else loader
            epoch_loader.set_epoch(state.epoch)
            batches = iter(epoch_loader)
            while state.step < total and not state.stopped_early:
                group = list(itertools.islice(batches, cfg.grad_accum))  # the step's micro-batches
                if not group:  # an empty loader
                    state.epoch, state.batch = state.epoch + 1, 0
                    break
                state.batch += len(group)
                lr = scheduler.get_last_lr()[0]  # this step's rate: train_step moves the schedule to the next one
                loss = train_step(group)
                state.step += 1
                last_loss = loss if math.isfinite(loss) else last_loss
                record(loss, lr)
                if on_step:
                    on_step(state.step, total, last_loss, lr)
                if stop_requested is not None and stop_agreed(stop_requested()):
                    raise StepInterrupt(state.step, total)
                if evaluator and cfg.eval_every and state.step % cfg.eval_every == 0:
                    run_eval()
                if state.batch >= len(loader):  # epoch done: the position is the next one's start
                    state.epoch, state.batch = state.epoch + 1, 0
                if cfg.save_every and state.step % cfg.save_every == 0:
                    state.elapsed_s = round(time.perf_counter() - start, 3)
                    checkpoints.save(accelerator, cfg.output_dir, state, fingerprint, cfg.keep_checkpoints)
                if state.batch == 0:
                    break
    accelerator.wait_for_everyone()
    return state.step, last_loss


def prepare_run_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from, if any.

    Resuming into the run folder the checkpoint belongs to needs no ``--overwrite``.
    """
    from florence_kit.checkpoints import resolve_resume

    if not cfg.resume:
        check_output_dir(out, cfg.overwrite)
        return None
    checkpoint = resolve_resume(cfg.resume, out)
    if checkpoint.resolve().parent.parent != out.resolve():
        check_output_dir(out, cfg.overwrite)
    return checkpoint


def restart_log(log_path: Path, step: int, checkpoint: Path) -> None:
    """On resume, drop log records past the checkpoint's step (the resumed run writes them again) and mark it."""
    kept = []
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    kept.append(json.dumps({"step": step, "event": "resume", "checkpoint": str(checkpoint)}))
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    tmp.replace(log_path)


def save_best(model: Any, out: Path, step: int, metric: str, value: float,
              save_model: Callable[[Any, Path], None]) -> None:
    """``<run>/best``: the best model so far by the task's metric, swapped in whole (never half-written)."""
    tmp, best, old = out / ".tmp-best", out / "best", out / ".old-best"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    (tmp / "eval.json").write_text(json.dumps({"step": step, "metric": metric, metric: value}) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)


def make_evaluator(task: Any, cfg: TrainConfig, processor: Any) -> Callable[[Any], tuple[str, float]]:
    """Score the model on the task's eval split (first ``--eval-max-samples`` rows) with the task's metric."""
    from florence_kit.data import load_split
    from florence_kit.evaluate import evaluate

    split = load_split(task, cfg.dataset, task.dataset.eval_split)
    if cfg.eval_max_samples:
        split = split.select(range(min(cfg.eval_max_samples, len(split))))

    def run(model: Any) -> tuple[str, float]:
        metrics = evaluate(model, processor, task, split, batch_size=cfg.batch_size, show_progress=False,
                           thumbnail_size=None).metrics
        value = metrics[metrics["metric"]]
        if value is None:
            raise UserError(f"--eval-every: the '{task.dataset.eval_split}' split has no references to score")
        return metrics["metric"], float(value)

    return run


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


def answered(rows: Iterable[tuple[int, str, str | None]], column: str) -> Iterator[tuple[int, str, str | None]]:
    """Training rows, checked before training starts: a row without an answer is an error naming it."""
    missing = []
    for index, prompt, target in rows:
        if target is None:
            missing.append(index)
        yield index, prompt, target
    if missing:
        raise UserError(
            f"{len(missing)} training row(s) have no answer in column '{column}' (null or an empty list; "
            f"first: row {missing[0]}); fix or remove them"
        )


def finetune(
    cfg: TrainConfig,
    *,
    quiet: bool = False,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """The whole ``florence-kit finetune`` job (in every process under ``accelerate launch``/``torchrun``).

    Only the main process prints and writes files; the others train their share of each batch.
    """
    from accelerate import PartialState

    from florence_kit.adapters import base_reference, check_adapter_options, load_quantized, save_adapter, wrap_lora
    from florence_kit.card import write_card
    from florence_kit.collate import max_positions, preflight
    from florence_kit.errors import RunInterrupted
    from florence_kit.hub import check_can_push, push_run
    from florence_kit.mixing import training_data
    from florence_kit.model import load_model, save_checkpoint
    from florence_kit.modes import (
        ADAPTER_MODES,
        Mode,
        apply_mode,
        frozen_components,
        learning_rate,
        summary,
        trainable_counts,
    )
    from florence_kit.precision import device_facts, resolve_precision
    from florence_kit.progress import StepProgress
    from florence_kit.region_data import bad_box_lines, with_box_format
    from florence_kit.registry import resolve_tasks
    from florence_kit.runconfig import check_options, options_dict
    from florence_kit.runfolder import ImageGuard, StepInterrupt, save_atomically, stop_at_step_end
    from florence_kit.trackers import check_report_to

    resolve_precision(cfg.precision, device_facts())  # a precision this machine cannot run fails before any write
    out = Path(cfg.output_dir)
    check_options(cfg)
    check_report_to(cfg.report_to)
    if cfg.push_to_hub:
        check_can_push(cfg.push_to_hub)  # before hours of training, not after
    procs = PartialState(cpu=multi_process_cpu())  # joins the process group under accelerate launch / torchrun
    main = procs.is_main_process
    say = print_fn if main else (lambda _message: None)
    resume_from = prepare_run_dir(cfg, out)
    procs.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    tasks = resolve_tasks(cfg.task, cfg.tasks_dirs)  # one task, "a,b" or a group: several are mixed
    if cfg.eval_every and len(tasks) > 1:
        raise UserError("--eval-every scores one task; with several tasks, evaluate each with `florence-kit eval`")
    tasks = [with_box_format(t, cfg.box_format) for t in tasks]  # regions: --box-format (None: unchanged)
    optim = check_adapter_options(cfg)
    if cfg.cache_vision_features and "vision" not in frozen_components(cfg.mode, cfg.lora_vision):
        raise UserError("--cache-vision-features needs a frozen vision tower: use --mode frozen-encoder, "
                        "lora or qlora (without --lora-vision)")  # checked before anything is written
    chosen_optim, chosen_lr = cfg.optim, cfg.lr
    cfg = replace(cfg, optim=optim, lr=learning_rate(cfg.lr, cfg.mode))  # config.yaml records what ran
    # the model before the data: a bad --model (or a mode this machine cannot run) fails in seconds
    model, processor = load_quantized(cfg.model) if cfg.mode == "qlora" else load_model(cfg.model)
    task = training_data(tasks, cfg.dataset, streaming=cfg.streaming, max_samples=cfg.max_samples,
                         mix_weights=cfg.mix_weights, seed=cfg.seed)
    dataset = task.dataset
    answers = ", ".join(sorted({t.references for t in tasks}))
    report = preflight(answered(dataset.texts(), answers), processor, max_positions(model.config), cfg.too_long)
    verb = {"truncate": "truncated", "drop": "dropped"}.get(cfg.too_long, "")
    say(
        f"length preflight: {len(report.too_long)} of {len(dataset)} examples exceed {report.limit} positions"
        + (f" ({verb})" if report.too_long else f" (longest {report.longest})")
    )
    for line in bad_box_lines(dataset):  # counted by the preflight's one pass, before training reads rows again
        say(line)
    if not report.keep:
        raise UserError("no training examples left after the length preflight")
    evaluator = make_evaluator(tasks[0], cfg, processor) if cfg.eval_every else None

    if cfg.fit == "auto":
        from florence_kit.memory import fit_auto, fit_of_checkpoint

        kept = set(report.keep)
        reused = fit_of_checkpoint(cfg, resume_from, say) if resume_from is not None else None
        cfg = reused or fit_auto(cfg, model, processor, (row for row in dataset.texts() if row[0] in kept), say)
    elif cfg.fit != "off":
        raise UserError(f"--fit must be off or auto, got '{cfg.fit}'")
    adapter = Mode(cfg.mode) in ADAPTER_MODES
    if adapter:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # LoRA's A matrices start random: the same --seed must give the same run
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_vision)
    apply_mode(model, cfg.mode, cfg.lora_vision)
    counts = trainable_counts(model)
    say(summary(counts))
    if not chosen_optim and optim != "adamw":
        say(f"optimizer: {optim} (the {cfg.mode} default on this machine; paged needs CUDA)")
    if chosen_lr is None and Mode(cfg.mode) in ADAPTER_MODES:
        say(f"learning rate: {cfg.lr:g} (the {cfg.mode} default; --lr to change)")
    log_path = out / "metrics.jsonl"
    run_info: dict[str, Any] = {"task_origin": task.origin, "examples": len(report.keep),
                                "dropped": len(report.too_long), **({"mix": task.mix} if task.mix else {})}
    start_step = TrainState.from_file(resume_from / "trainer_state.json")[0].step if resume_from is not None else 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            restart_log(log_path, start_step, resume_from)
            say(f"resuming from {resume_from} (step {start_step})")
        else:
            log_path.write_text("")
            for stale in ("checkpoints", "best", "tensorboard"):  # an earlier run's, in a folder reused by --overwrite
                shutil.rmtree(out / stale, ignore_errors=True)
        write_config(cfg, out, run_info)
    procs.wait_for_everyone()

    def save_model(trained: Any, folder: Path) -> None:
        if adapter:
            save_adapter(trained, processor, folder, base_reference(cfg.model))
        else:
            save_checkpoint(trained, processor, folder)

    def on_best(best_model: Any, step: int, value: float) -> None:
        save_best(best_model, out, step, tasks[0].metric, value, save_model)

    rows = ImageGuard(dataset, report.keep, skip=cfg.skip_bad_images)
    state = TrainState()
    start = time.perf_counter()
    interrupted: StepInterrupt | None = None
    samples_per_step = cfg.batch_size * cfg.grad_accum * procs.num_processes
    with StepProgress(f"fine-tuning {task.name} ({cfg.mode})", samples_per_step, quiet or not main,
                      log_every=cfg.log_every, print_fn=say) as bar, stop_at_step_end() as stop:

        try:
            steps, loss = train_loop(
                model, processor, rows, cfg, log_path,
                on_step=bar.update, collate_truncate=cfg.too_long == "truncate",
                evaluator=evaluator, on_best=on_best, resume_from=resume_from, state=state,
                stop_requested=lambda: stop.requested,
            )
        except StepInterrupt as exc:
            interrupted = exc
            steps, loss = exc.step, bar.last.get("loss", float("nan"))
    seconds = time.perf_counter() - start
    if rows.skipped:
        say(f"warning: skipped {len(rows.skipped)} row(s) with unreadable images "
            f"(rows {', '.join(map(str, rows.skipped[:10]))}{', ...' if len(rows.skipped) > 10 else ''})")
    run_info.update(steps=steps, final_loss=loss, skipped_bad_images=len(rows.skipped))
    if interrupted:
        run_info.update(interrupted_at_step=interrupted.step, total_steps=interrupted.total)
    if main:
        save_atomically(out, lambda folder: save_model(model, folder))
        write_config(cfg, out, run_info)
        write_card(out, options_dict(cfg), run_info)
    procs.wait_for_everyone()
    if interrupted:
        raise RunInterrupted(
            f"interrupted (Ctrl-C) at step {interrupted.step} of {interrupted.total}; the model at that step, "
            f"config.yaml, README.md and metrics.jsonl are saved in '{out}'"
        )
    if cfg.push_to_hub and main:
        say(f"pushed to {push_run(out, cfg.push_to_hub)}")
    return TrainResult(out, steps, loss, seconds, len(report.too_long), counts, state, start_step)
