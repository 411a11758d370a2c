"""The one training loop, on Accelerate: setup → preflight → train → save.

Read it top to bottom: the run folder is checked, the task's data is loaded and length-checked,
the mode decides which parameters train, AdamW + a warmup schedule step through the batches
(Accelerate handles devices and gradient accumulation), and the final model, processor, resolved
config and metrics log land in the output folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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
    lr: float = 1e-5
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
    # --- run folder ---
    report_to: str = "none"
    push_to_hub: str | None = None
    skip_bad_images: bool = False


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    seconds: float
    dropped: int
    trainable: dict[str, tuple[int, int]]


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Never write over an earlier run by accident."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        from florence_kit.runfolder import describe_output_dir

        raise UserError(describe_output_dir(out))


def write_config(cfg: TrainConfig, out: Path, extra: dict[str, Any]) -> None:
    """Every resolved option at the top level (``--config`` reads it back), then ``versions`` and ``run``.

    ``run`` records facts about this run (task origin, example counts, the git commit of the working
    directory); ``versions`` the libraries and florence-kit's own commit. ``--config`` ignores both.
    """
    import yaml

    from florence_kit.runconfig import options_dict
    from florence_kit.versions import git_commit, versions

    data = options_dict(cfg)
    data.update(versions=versions(), run={**extra, "git_commit": git_commit(Path.cwd())})
    tmp = out / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(out / "config.yaml")


def forward_loss(model: Any, batch: dict[str, Any], frozen_vision: bool, feature_cache: Any = None) -> Any:
    """Loss of one batch. With the vision tower frozen, it runs under ``no_grad``: no activations kept.

    ``feature_cache`` (a :class:`florence_kit.feature_cache.VisionFeatureCache`) serves the frozen tower's
    output for images seen before, so DaViT runs once per distinct image.
    """
    import torch

    from florence_kit.modes import unwrap

    if not frozen_vision:
        return model(**batch).loss
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
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


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


def train_loop(
    model: Any,
    processor: Any,
    dataset: Any,
    cfg: TrainConfig,
    log_path: Path,
    on_step: Callable[[int, int, float, float], None] | None = None,
    collate_truncate: bool = False,
) -> tuple[int, float]:
    """Train ``model`` in place on ``dataset`` (examples); returns (optimizer steps, last loss)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from florence_kit.adapters import default_optim
    from florence_kit.collate import Collator, max_positions
    from florence_kit.modes import apply_mode, component, frozen_components

    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got '{cfg.schedule}'")
    from florence_kit import trackers  # --- run folder: trackers ---

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              **trackers.accelerator_kwargs(cfg.report_to, cfg.output_dir))
    trackers.start(accelerator, cfg.report_to, asdict(cfg), cfg.output_dir)
    set_seed(cfg.seed)
    apply_mode(model, cfg.mode, cfg.lora_vision)
    frozen_vision = "vision" in frozen_components(cfg.mode, cfg.lora_vision)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.optim or default_optim(cfg.mode))
    collator = Collator(processor, max_length=max_positions(model.config), truncate=collate_truncate)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=collator,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_schedule(cfg.schedule, cfg.warmup_steps, total))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    if frozen_vision:  # no dropout / drop-path in a frozen tower: it must behave as at inference
        component(accelerator.unwrap_model(model), "vision").eval()
    feature_cache = None
    if cfg.cache_vision_features:  # --- trainspeed: vision-feature cache ---
        from florence_kit.feature_cache import VisionFeatureCache

        if not frozen_vision:
            raise UserError("--cache-vision-features needs a frozen vision tower: use --mode frozen-encoder, "
                            "lora or qlora (without --lora-vision)")
        cache_root = cfg.vision_cache_dir or Path(cfg.output_dir) / "vision_cache"
        feature_cache = VisionFeatureCache(cache_root, component(accelerator.unwrap_model(model), "vision"))

    step, last_loss, micro_losses, start = 0, float("nan"), [], time.perf_counter()
    with log_path.open("a") as log, accelerator_trackers_closed(accelerator):
        while step < total:
            for batch in loader:
                with accelerator.accumulate(model):
                    loss = forward_loss(model, batch, frozen_vision, feature_cache)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_losses.append(loss.detach().float().item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                last_loss = sum(micro_losses) / len(micro_losses)
                micro_losses = []
                lr = scheduler.get_last_lr()[0]
                if step % cfg.log_every == 0 or step == total or step == 1:
                    record = {"step": step, "loss": round(last_loss, 6), "lr": lr,
                              "samples": step * cfg.batch_size * cfg.grad_accum,
                              "elapsed_s": round(time.perf_counter() - start, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    accelerator.log(record, step=step)
                if on_step:
                    on_step(step, total, last_loss, lr)
                if step >= total:
                    break
    accelerator.wait_for_everyone()
    return step, last_loss


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
    """The whole ``florence-kit finetune`` job."""
    from florence_kit.adapters import base_reference, check_adapter_options, load_quantized, save_adapter, wrap_lora
    from florence_kit.card import write_card
    from florence_kit.collate import max_positions, preflight
    from florence_kit.errors import RunInterrupted
    from florence_kit.hub import check_can_push, push_run
    from florence_kit.mixing import training_data
    from florence_kit.model import load_model, save_checkpoint
    from florence_kit.modes import ADAPTER_MODES, Mode, apply_mode, summary, trainable_counts
    from florence_kit.progress import StepProgress
    from florence_kit.registry import resolve_tasks
    from florence_kit.runconfig import check_options, options_dict
    from florence_kit.runfolder import ImageGuard, StepInterrupt, save_atomically, stop_at_step_end
    from florence_kit.trackers import check_report_to

    out = Path(cfg.output_dir)
    check_options(cfg)
    check_output_dir(out, cfg.overwrite)
    check_report_to(cfg.report_to)
    if cfg.push_to_hub:
        check_can_push(cfg.push_to_hub)  # before hours of training, not after
    tasks = resolve_tasks(cfg.task, cfg.tasks_dirs)  # one task, "a,b" or a group: several are mixed
    optim = check_adapter_options(cfg)
    chosen_optim, cfg = cfg.optim, replace(cfg, optim=optim)  # config.yaml records the optimizer that ran
    # the model before the data: a bad --model (or a mode this machine cannot run) fails in seconds
    model, processor = load_quantized(cfg.model) if cfg.mode == "qlora" else load_model(cfg.model)
    task = training_data(tasks, cfg.dataset, streaming=cfg.streaming, max_samples=cfg.max_samples,
                         mix_weights=cfg.mix_weights, seed=cfg.seed)
    dataset = task.dataset
    answers = ", ".join(sorted({t.references for t in tasks}))
    report = preflight(answered(dataset.texts(), answers), processor, max_positions(model.config), cfg.too_long)
    verb = {"truncate": "truncated", "drop": "dropped"}.get(cfg.too_long, "")
    print_fn(
        f"length preflight: {len(report.too_long)} of {len(dataset)} examples exceed {report.limit} positions"
        + (f" ({verb})" if report.too_long else f" (longest {report.longest})")
    )
    if not report.keep:
        raise UserError("no training examples left after the length preflight")

    adapter = Mode(cfg.mode) in ADAPTER_MODES
    if adapter:
        model = wrap_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_vision)
    apply_mode(model, cfg.mode, cfg.lora_vision)
    counts = trainable_counts(model)
    print_fn(summary(counts))
    if not chosen_optim and optim != "adamw":
        print_fn(f"optimizer: {optim} (the {cfg.mode} default on this machine; paged needs CUDA)")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics.jsonl"
    log_path.write_text("")
    run_info: dict[str, Any] = {"task_origin": task.origin, "examples": len(report.keep),
                                "dropped": len(report.too_long), **({"mix": task.mix} if task.mix else {})}
    write_config(cfg, out, run_info)
    rows = ImageGuard(dataset, report.keep, skip=cfg.skip_bad_images)
    start = time.perf_counter()
    interrupted: StepInterrupt | None = None
    with StepProgress(f"fine-tuning {task.name} ({cfg.mode})", cfg.batch_size * cfg.grad_accum, quiet,
                      log_every=cfg.log_every, print_fn=print_fn) as bar, stop_at_step_end() as stop:

        def on_step(step: int, total: int, loss: float, lr: float) -> None:
            bar.update(step, total, loss, lr)
            if stop.requested:
                raise StepInterrupt(step, total)

        try:
            steps, loss = train_loop(
                model, processor, rows, cfg, log_path,
                on_step=on_step, collate_truncate=cfg.too_long == "truncate",
            )
        except StepInterrupt as exc:
            interrupted = exc
            steps, loss = exc.step, bar.last.get("loss", float("nan"))
    seconds = time.perf_counter() - start
    if rows.skipped:
        print_fn(f"warning: skipped {len(rows.skipped)} row(s) with unreadable images "
                 f"(rows {', '.join(map(str, rows.skipped[:10]))}{', ...' if len(rows.skipped) > 10 else ''})")
    run_info.update(steps=steps, final_loss=loss, skipped_bad_images=len(rows.skipped))
    if interrupted:
        run_info.update(interrupted_at_step=interrupted.step, total_steps=interrupted.total)
    if adapter:
        save_atomically(out, lambda folder: save_adapter(model, processor, folder, base_reference(cfg.model)))
    else:
        save_atomically(out, lambda folder: save_checkpoint(model, processor, folder))
    write_config(cfg, out, run_info)
    write_card(out, options_dict(cfg), run_info)
    if interrupted:
        raise RunInterrupted(
            f"interrupted (Ctrl-C) at step {interrupted.step} of {interrupted.total}; the model at that step, "
            f"config.yaml, README.md and metrics.jsonl are saved in '{out}'"
        )
    if cfg.push_to_hub:
        print_fn(f"pushed to {push_run(out, cfg.push_to_hub)}")
    return TrainResult(out, steps, loss, seconds, len(report.too_long), counts)
