"""The training loop on Accelerate: set up, then epochs of optimizer steps, each one screen of code.

:func:`train_loop` reads top to bottom: :func:`setup` builds a :class:`Loop` (model in its mode, data,
optimizer, schedule, Accelerate, a checkpoint to resume from), then :meth:`Loop.run_epoch` runs until the
step budget is spent. The optional paths are small helpers, not branches of one long function: the
prepared store (:func:`training_data`), the vision-feature cache (:func:`vision_feature_cache`), DDP
agreement on stopping (:meth:`Loop.stop_agreed`), ``--eval-every`` (:meth:`Loop.run_eval`) and
checkpoints (:meth:`Loop.save_checkpoint`). A step whose loss is NaN/inf is skipped and counted.
``--strategy fsdp`` shards the model in place before the optimizer is built (train/sharding.py); the loop
itself is the same for every strategy.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.train import checkpoints
from florence_kit.train.accelerator import accelerator_trackers_closed, make_accelerator, run_fingerprint
from florence_kit.train.checkpoints import TrainState
from florence_kit.train.config import SCHEDULES, TrainConfig
from florence_kit.train.runfolder import RunFolder, StepInterrupt
from florence_kit.train.sampling import make_sampler, mix_draws
from florence_kit.train.sharding import check_fsdp_options, plain_model, resolve_strategy, shard, shares
from florence_kit.train.step import forward_loss, make_optimizer, warmup_schedule

NONFINITE_LIMIT = 5  # consecutive non-finite losses before the run stops
Evaluator = Callable[[Any], tuple[str, float]]
OnBest = Callable[[Any, int, float], None]


def train_loop(
    model: Any,
    processor: Any,
    dataset: Any,
    cfg: TrainConfig,
    run_folder: RunFolder,
    on_step: Callable[[int, int, float, float], None] | None = None,
    collate_truncate: bool = False,
    *,
    evaluator: Evaluator | None = None,
    on_best: OnBest | None = None,
    resume_from: Path | None = None,
    state: TrainState | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_shares: Callable[[str, list[dict[str, int]]], None] | None = None,
) -> tuple[int, float]:
    """Train ``model`` in place on ``dataset`` (examples); returns (optimizer steps, last loss).

    ``evaluator(unwrapped_model) -> (metric name, value)`` runs on the main process every ``cfg.eval_every``
    steps, and ``on_best(unwrapped_model, step, value)`` when the value improved (up, or down for a metric
    registered ``higher_is_better=False`` such as CER);
    ``resume_from`` is a checkpoint folder; pass ``state`` to read the run's counters afterwards.
    ``on_shares(strategy, shares)`` is called once, after the first step, with what each process holds
    (train/sharding.py: ``none``, ``ddp`` or ``fsdp``; elements of parameters, gradients, optimizer state).
    ``stop_requested()`` (Ctrl-C seen) is asked after every step; under DDP the processes agree on it, so
    all of them stop after the same step and :class:`~florence_kit.train.runfolder.StepInterrupt` is raised on each.
    """
    loop = setup(model, processor, dataset, cfg, collate_truncate, resume_from, state, evaluating=evaluator is not None)
    loop.evaluator, loop.on_best = evaluator, on_best
    if on_shares is not None:
        loop.on_shares = lambda ranks: on_shares(loop.strategy, ranks)
    loop.set_train_mode()
    loop.start = time.perf_counter() - loop.state.elapsed_s  # a resume goes on counting
    with contextlib.ExitStack() as stack:
        loop.log = stack.enter_context(run_folder.metrics_log()) if loop.accelerator.is_main_process else None
        stack.enter_context(accelerator_trackers_closed(loop.accelerator))
        while loop.state.step < loop.total and not loop.state.stopped_early:  # one pass per epoch
            loop.run_epoch(on_step, stop_requested)
    loop.accelerator.wait_for_everyone()
    return loop.state.step, loop.last_loss


# ---------------------------------------------------------------------------------------------
# Setup


def setup(model: Any, processor: Any, dataset: Any, cfg: TrainConfig, collate_truncate: bool,
          resume_from: Path | None, state: TrainState | None, evaluating: bool = False) -> Loop:
    """Everything the loop needs, prepared by Accelerate, and the checkpoint's state loaded when resuming."""
    import torch

    from florence_kit.model.adapters import default_optim
    from florence_kit.model.modes import learning_rate
    from florence_kit.train import trackers

    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    strategy = resolve_strategy(cfg.strategy)
    accelerator = make_accelerator(cfg.precision, **trackers.accelerator_kwargs(cfg.report_to, cfg.output_dir))
    if strategy == "fsdp":
        check_fsdp_options(cfg, str(accelerator.mixed_precision))
    trackers.start(accelerator, cfg.report_to, asdict(cfg), cfg.output_dir)
    frozen_vision = model_for_training(model, cfg, accelerator, evaluating)
    if strategy == "fsdp":  # sharded in place before the optimizer sees the parameters (it holds the shards)
        model = shard(model, accelerator.device)
    optimizer = make_optimizer(model, learning_rate(cfg.lr, cfg.mode), cfg.weight_decay,
                               cfg.optim or default_optim(cfg.mode))
    loader, sampler, normalizer = training_data(dataset, processor, cfg, accelerator, model, collate_truncate)
    loader = accelerator.prepare(loader)  # first: its per-process length sets the schedule
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(loader) / cfg.grad_accum)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(cfg.schedule, cfg.warmup_steps, total))
    if strategy == "fsdp":  # Accelerate would wrap the model in DDP and save only the main process's optimizer shard
        scheduler = accelerator.prepare(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    checkpoints.install_hooks(accelerator)
    fingerprint = run_fingerprint(cfg, accelerator)
    state = state if state is not None else TrainState()
    sharded = (model, optimizer) if strategy == "fsdp" else None
    if resume_from is not None:
        vars(state).update(vars(checkpoints.load(accelerator, resume_from, fingerprint, sharded)))
    return Loop(cfg, accelerator, model, optimizer, scheduler, loader, sampler, total, frozen_vision, fingerprint,
                state, normalizer, vision_feature_cache(cfg, accelerator, model, frozen_vision), strategy=strategy)


def model_for_training(model: Any, cfg: TrainConfig, accelerator: Any, evaluating: bool) -> bool:
    """Seed, mode, activation checkpointing and compile applied to ``model``; True when the vision tower is frozen."""
    from accelerate.utils import set_seed

    from florence_kit.model.modes import apply_mode, frozen_components

    set_seed(cfg.seed)
    apply_mode(model, cfg.mode, cfg.lora_vision)
    if cfg.gradient_checkpointing:
        from florence_kit.model.activation_checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if cfg.compile:  # --- trainspeed ---
        from florence_kit.model.compiling import compile_regions

        compile_regions(model)
    return "vision" in frozen_components(cfg.mode, cfg.lora_vision)


def training_data(dataset: Any, processor: Any, cfg: TrainConfig, accelerator: Any, model: Any,
                  collate_truncate: bool) -> tuple[Any, Any, Any]:
    """(loader, sampler, normalizer): batches of ``dataset`` in the epoch order.

    With ``--prepare-data`` the images are decoded and resized once into the prepared store (filled by the
    main process, read back by the others) and uint8 pixels are normalised by ``normalizer`` in the step.
    """
    import torch
    from torch.utils.data import DataLoader

    from florence_kit.data.collate import Collator, max_positions

    collator: Any = Collator(processor, max_length=max_positions(model.config), truncate=collate_truncate)
    normalizer: Any = None
    rows = dataset  # before --prepare-data: a weighted mix's draws are found through its rows
    if cfg.prepare_data:  # --- trainspeed: decode and resize once, tokenise once ---
        from florence_kit.data.prepared import prepare_training_data

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
    return loader, sampler, normalizer


def vision_feature_cache(cfg: TrainConfig, accelerator: Any, model: Any, frozen_vision: bool) -> Any:
    """``--cache-vision-features``: the frozen tower's outputs kept on disk, one DaViT pass per distinct image."""
    if not cfg.cache_vision_features:
        return None
    from florence_kit.model.modes import FROZEN_VISION_HINT, component
    from florence_kit.train.feature_cache import VisionFeatureCache

    if not frozen_vision:
        raise UserError(f"--cache-vision-features needs a frozen vision tower: {FROZEN_VISION_HINT}")
    cache_root = cfg.vision_cache_dir or Path(cfg.output_dir) / "vision_cache"
    return VisionFeatureCache(cache_root, component(accelerator.unwrap_model(model), "vision"),
                              compute=str(accelerator.mixed_precision))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Loop:
    """A run while it trains: what :func:`setup` built, the counters (``state``) and the open metrics log."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: Any
    total: int
    frozen_vision: bool
    fingerprint: dict[str, Any]
    state: TrainState
    normalizer: Any = None
    feature_cache: Any = None
    evaluator: Evaluator | None = None
    on_best: OnBest | None = None
    log: Callable[[dict[str, Any]], None] | None = None  # RunFolder.metrics_log's writer (main process)
    start: float = 0.0
    last_loss: float = float("nan")
    strategy: str = "none"  # none | ddp | fsdp (train/sharding.py)
    on_shares: Callable[[list[dict[str, int]]], None] | None = None  # what each process holds, after the first step

    def run_epoch(self, on_step: Callable[[int, int, float, float], None] | None,
                  stop_requested: Callable[[], bool] | None) -> None:
        """Steps from the saved position (a resume skips the batches it has seen) to the epoch's end or the budget."""
        s, cfg = self.state, self.cfg
        self.sampler.set_epoch(s.epoch)
        epoch_loader = self.accelerator.skip_first_batches(self.loader, s.batch) if s.batch else self.loader
        epoch_loader.set_epoch(s.epoch)
        batches = iter(epoch_loader)
        while s.step < self.total and not s.stopped_early:
            group = list(itertools.islice(batches, cfg.grad_accum))  # the step's micro-batches
            if not group:  # an empty loader
                s.epoch, s.batch = s.epoch + 1, 0
                return
            s.batch += len(group)
            lr = self.scheduler.get_last_lr()[0]  # this step's rate: train_step moves the schedule to the next one
            loss = self.train_step(group)
            s.step += 1
            self.last_loss = loss if math.isfinite(loss) else self.last_loss
            self.record(loss, lr)
            if on_step:
                on_step(s.step, self.total, self.last_loss, lr)
            if stop_requested is not None and self.stop_agreed(stop_requested()):
                raise StepInterrupt(s.step, self.total)
            if self.evaluator and cfg.eval_every and s.step % cfg.eval_every == 0:
                self.run_eval()
            if s.batch >= len(self.loader):  # epoch done: the position is the next one's start
                s.epoch, s.batch = s.epoch + 1, 0
            if cfg.save_every and s.step % cfg.save_every == 0:
                self.save_checkpoint()
            if s.batch == 0:
                return

    def train_step(self, group: list[dict[str, Any]]) -> float:
        """One optimizer step over ``group`` (its micro-batches); returns the step's mean token loss.

        The loss is summed over target tokens and divided by the count of the whole global batch (all
        micro-batches, all processes), so accumulation and DDP average exactly as one big batch would.
        """
        import torch

        from florence_kit.data.collate import IGNORE_INDEX

        acc = self.accelerator
        local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group)
        tokens = acc.reduce(torch.tensor(float(local), device=acc.device), "sum")
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(group):
            if self.normalizer is not None:
                batch = {**batch, "pixel_values": self.normalizer(batch["pixel_values"])}
            sync = acc.no_sync(self.model) if i < len(group) - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                # under FSDP the frozen tower runs inside the sharded root (its gathers need the root's forward)
                loss = forward_loss(self.model, batch, self.frozen_vision and self.strategy != "fsdp",
                                    num_items=tokens, feature_cache=self.feature_cache)
                loss = loss * acc.num_processes
                acc.backward(loss)
            loss_sum += loss.detach().float()
        mean_loss = float(acc.reduce(loss_sum, "sum")) / acc.num_processes
        if not math.isfinite(mean_loss):  # the same verdict on every process: the reduced loss is shared
            self.optimizer.zero_grad(set_to_none=True)
            return mean_loss
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 loss scaling skips steps whose gradients overflowed
            self.scheduler.step()
        if self.on_shares is not None:  # once, while gradients and optimizer state both exist
            self.on_shares(shares(self.model, self.optimizer))
            self.on_shares = None
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss

    def set_train_mode(self) -> None:
        from florence_kit.model.modes import component

        self.model.train()
        if self.frozen_vision:  # no dropout / drop-path in a frozen tower: it must behave as at inference
            component(self.accelerator.unwrap_model(self.model), "vision").eval()

    def write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (main process), and the same numbers to the trackers."""
        if self.log is not None:
            self.log(record)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if numbers:  # --- run folder: trackers --- (a no-op without --report-to)
            self.accelerator.log(numbers, step=record["step"])

    def record(self, loss: float, lr: float) -> None:
        """Log the step; count a non-finite loss, and stop after NONFINITE_LIMIT in a row."""
        s, cfg = self.state, self.cfg
        if math.isfinite(loss):
            s.nonfinite_in_a_row = 0
            if s.step % cfg.log_every == 0 or s.step == self.total or s.step == 1:
                self.write({"step": s.step, "loss": round(loss, 6), "lr": lr,
                            "samples": s.step * cfg.batch_size * cfg.grad_accum * self.accelerator.num_processes,
                            "elapsed_s": round(time.perf_counter() - self.start, 3)})
            return
        s.nonfinite_steps += 1
        s.nonfinite_in_a_row += 1
        self.write({"step": s.step, "loss": None, "skipped": "non-finite loss", "nonfinite_steps": s.nonfinite_steps})
        if s.nonfinite_in_a_row >= NONFINITE_LIMIT:
            raise UserError(
                f"training stopped at step {s.step}: the loss was NaN/inf in {NONFINITE_LIMIT} consecutive "
                "steps (their updates were skipped); lower --lr, use --precision fp32 or bf16 instead of fp16, "
                "or check the data"
            )

    def stop_agreed(self, requested: bool) -> bool:
        """Any process asking to stop stops all of them after this step (a SIGINT reaches each on its own time:
        one stopping alone would leave the others waiting in the next step's gradient all-reduce)."""
        import torch

        acc = self.accelerator
        if acc.num_processes == 1:
            return requested
        votes = acc.reduce(torch.tensor(float(requested), device=acc.device), "sum")
        return float(votes) > 0

    def run_eval(self) -> None:
        """Score on the main process, share the score, keep the best model, and decide on early stopping."""
        from accelerate.utils import broadcast_object_list

        from florence_kit.metrics import get_metric

        assert self.evaluator is not None
        acc, s = self.accelerator, self.state
        whole = plain_model(acc.unwrap_model(self.model))  # under FSDP: weights gathered into the main process's copy
        if self.strategy == "fsdp" and whole is not None:
            whole.to(acc.device)  # generation on the run's device; the copy goes back to CPU memory after
        result = [self.evaluator(whole) if acc.is_main_process else None]
        name, value = broadcast_object_list(result)[0] if acc.num_processes > 1 else result[0]
        self.set_train_mode()
        better = (lambda a, b: a > b) if get_metric(name).higher_is_better else (lambda a, b: a < b)
        if s.best_metric is None or better(value, s.best_metric):
            s.best_metric, s.best_step, s.evals_since_best = value, s.step, 0
            if self.on_best is not None and acc.is_main_process:
                self.on_best(whole, s.step, value)
        else:
            s.evals_since_best += 1
        if self.strategy == "fsdp" and whole is not None:
            whole.to("cpu")
        self.write({"step": s.step, f"eval/{name}": value, "best": s.best_metric, "best_step": s.best_step})
        if self.cfg.early_stopping_patience and s.evals_since_best >= self.cfg.early_stopping_patience:
            s.stopped_early = True
            self.write({"step": s.step, "event": "early stopping", "evals_without_improvement": s.evals_since_best})
        acc.wait_for_everyone()

    def save_checkpoint(self) -> None:
        """``--save-every``: the resumable state (weights, optimizer, schedule, RNG, position, counters)."""
        self.state.elapsed_s = round(time.perf_counter() - self.start, 3)
        checkpoints.save(self.accelerator, self.cfg.output_dir, self.state, self.fingerprint,
                         self.cfg.keep_checkpoints, (self.model, self.optimizer) if self.strategy == "fsdp" else None)
