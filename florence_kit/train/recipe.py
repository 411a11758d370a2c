"""``florence-kit finetune`` as one recipe: setup -> train -> save, each step a function you can see whole.

- **setup**: every check that can fail before a file is written; the model (before the data, so a bad
  ``--model`` fails in seconds); the data, length-checked; ``--fit auto``; the training mode; the run folder.
- **train**: :func:`florence_kit.train.loop.train_loop` under a progress bar; Ctrl-C stops after the step
  in progress, and what was trained is still saved.
- **save**: the model (swapped in whole), ``config.yaml``, the model card (README.md).

Only the main process prints and writes files; under ``accelerate launch``/``torchrun`` the others train
their share of each batch. Pushing to the hub (``--push-to-hub``) is the command's last step (cli/finetune.py).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from florence_kit.common.errors import UserError
from florence_kit.train.accelerator import multi_process_cpu
from florence_kit.train.checkpoints import TrainState
from florence_kit.train.config import TrainConfig, TrainResult, check_output_dir, write_config
from florence_kit.train.loop import train_loop
from florence_kit.train.sharding import launcher_asked_fsdp

View = TypeVar("View")


def view(cls: type[View], cfg: TrainConfig) -> View:
    """A model/ dataclass (what one model/ function reads) filled from the TrainConfig fields of the same names:
    model/ sees typed values, never the whole config."""
    return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass
class Run:
    """One fine-tuning run between its steps: the options, the process group, the model and its data."""

    cfg: TrainConfig
    procs: Any  # accelerate's PartialState: which process this is
    say: Callable[[str], None]  # print on the main process only
    resume_from: Path | None
    tasks: list[Any]
    model: Any = None
    processor: Any = None
    data: Any = None  # florence_kit.data.mixing.TrainingData: the examples and where they came from
    report: Any = None  # the length preflight: which examples are kept
    speed: dict[str, Any] = field(default_factory=dict)  # --speed's decision, for config.yaml's ``run`` record
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # trainable / total parameters per component
    run_info: dict[str, Any] = field(default_factory=dict)  # config.yaml's ``run`` record
    start_step: int = 0
    strategy: str = "none"  # none | ddp | fsdp: what this launch runs (train/sharding.py)
    launcher_fsdp: bool = False  # FSDP asked by accelerate launch --use_fsdp (ACCELERATE_USE_FSDP)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.procs.is_main_process

    @property
    def adapter(self) -> bool:
        from florence_kit.model.modes import mode_row

        return mode_row(self.cfg.mode).adapters


@dataclass
class Outcome:
    """What the train step hands to the save step."""

    steps: int
    loss: float
    seconds: float
    state: TrainState
    skipped_images: list[int]
    interrupted: Any = None  # florence_kit.train.runfolder.StepInterrupt when Ctrl-C stopped the run


def finetune(cfg: TrainConfig, *, quiet: bool = False, print_fn: Callable[[str], None] = print) -> TrainResult:
    """The whole ``florence-kit finetune`` job (in every process under ``accelerate launch``/``torchrun``)."""
    run = setup(cfg, print_fn)
    outcome = train(run, quiet)
    return save(run, outcome)


# ---------------------------------------------------------------------------------------------
# Setup


def setup(cfg: TrainConfig, print_fn: Callable[[str], None]) -> Run:
    """Checks, then the model, the data, the memory fit and the mode; the run folder is started last."""
    from accelerate import PartialState

    from florence_kit.model.loading import load_for_training, load_quantized
    from florence_kit.model.modes import mode_row
    from florence_kit.model.positions import grow_for_training

    check_run_options(cfg)
    launcher_fsdp = launcher_asked_fsdp()  # read before check_strategy takes it out of the environment
    strategy = check_strategy(cfg)
    procs = PartialState(cpu=multi_process_cpu())  # joins the process group under accelerate launch / torchrun
    say = print_fn if procs.is_main_process else (lambda _message: None)
    resume_from = prepare_run_dir(cfg, Path(cfg.output_dir))
    procs.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    run = Run(cfg, procs, say, resume_from, training_tasks(cfg), strategy=strategy, launcher_fsdp=launcher_fsdp)
    chosen_optim, chosen_lr = cfg.optim, cfg.lr
    run.cfg = cfg = strategy_option(resolved_options(cfg), strategy)  # config.yaml records what ran
    quantized = mode_row(cfg.mode).quant_bits is not None  # 4-bit NF4, the one storage the table allows
    run.model, run.processor = load_quantized(cfg.model) if quantized else load_for_training(cfg.model)
    grown = grow_for_training(run.model, run.processor, cfg.max_target_length, cfg.mode)  # before the preflight
    if grown:
        run.say(grown)
    load_training_data(run)
    run.cfg = fit_memory(run)
    apply_training_mode(run, chosen_optim, chosen_lr)
    run.cfg = choose_speed(run)
    if run.resume_from is not None:  # refused here, not after the run folder was rewritten for the new settings
        check_resume_settings(run)
    start_run_folder(run)
    return run


def check_run_options(cfg: TrainConfig) -> None:
    """What can be refused from the options alone: a precision this machine cannot run, bad values, trackers."""
    from florence_kit.model.precision import device_facts, resolve_precision
    from florence_kit.train.config import check_options
    from florence_kit.train.trackers import check_report_to

    resolve_precision(cfg.precision, device_facts())
    check_options(cfg)
    check_report_to(cfg.report_to)


def check_strategy(cfg: TrainConfig) -> str:
    """``--strategy`` (and ``accelerate launch --use_fsdp``) resolved for this launch; what FSDP does not run,
    refused here, before the model is loaded."""
    from florence_kit.model.precision import ACCELERATE_NAME, device_facts, resolve_precision
    from florence_kit.train.sharding import check_fsdp_options, resolve_strategy

    strategy = resolve_strategy(cfg.strategy)
    if strategy == "fsdp":
        check_fsdp_options(cfg, ACCELERATE_NAME[resolve_precision(cfg.precision, device_facts())])
    return strategy


def strategy_option(cfg: TrainConfig, strategy: str) -> TrainConfig:
    """``cfg`` with ``--strategy fsdp`` when FSDP runs (also when the launcher asked for it: config.yaml says so
    and the loop does not depend on the launcher's environment)."""
    return replace(cfg, strategy="fsdp") if strategy == "fsdp" else cfg


def training_tasks(cfg: TrainConfig) -> list[Any]:
    """One task, "a,b" or a group (several are mixed), each reading its boxes in ``--box-format`` if given."""
    from florence_kit.tasks.region_block import with_box_format
    from florence_kit.tasks.registry import resolve_tasks

    tasks = resolve_tasks(cfg.task, cfg.tasks_dirs)
    if cfg.eval_every and len(tasks) > 1:
        raise UserError("--eval-every scores one task; with several tasks, evaluate each with `florence-kit eval`")
    if cfg.eval_every:  # a caption metric's tokenizer is checked now, not after the first --eval-every steps
        from florence_kit.metrics.readiness import check_metrics_ready

        check_metrics_ready(tasks[0].metrics)
    return [with_box_format(t, cfg.box_format) for t in tasks]


def resolved_options(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the optimizer and learning rate the mode resolves to (checked before anything is written)."""
    from florence_kit.model.adapters import AdapterOptions, check_adapter_options
    from florence_kit.model.modes import FROZEN_VISION_HINT, frozen_components, learning_rate

    optim = check_adapter_options(view(AdapterOptions, cfg))
    if cfg.cache_vision_features and "vision" not in frozen_components(cfg.mode, cfg.lora_vision):
        raise UserError(f"--cache-vision-features needs a frozen vision tower: {FROZEN_VISION_HINT}")
    return replace(cfg, optim=optim, lr=learning_rate(cfg.lr, cfg.mode))


def load_training_data(run: Run) -> None:
    """The tasks' examples (mixed when several), checked for answers and length, bad boxes counted."""
    from florence_kit.data.collate import max_positions, preflight
    from florence_kit.data.mixing import training_data
    from florence_kit.data.region_targets import bad_box_lines

    cfg = run.cfg
    run.data = training_data(run.tasks, cfg.dataset, streaming=cfg.streaming, max_samples=cfg.max_samples,
                             mix_weights=cfg.mix_weights, seed=cfg.seed)
    dataset = run.data.dataset
    answers = ", ".join(sorted({t.references for t in run.tasks}))
    run.report = report = preflight(answered(dataset.texts(), answers), run.processor,
                                    max_positions(run.model.config), cfg.too_long)
    verb = {"truncate": "truncated", "drop": "dropped"}.get(cfg.too_long, "")
    run.say(
        f"length preflight: {len(report.too_long)} of {len(dataset)} examples exceed {report.limit} positions"
        + (f" ({verb})" if report.too_long else f" (longest {report.longest})")
    )
    for line in bad_box_lines(dataset):  # counted by the preflight's one pass, before training reads rows again
        run.say(line)
    if not report.keep:
        raise UserError("no training examples left after the length preflight")


def fit_memory(run: Run) -> TrainConfig:
    """``--fit auto``: the micro-batch, accumulation and checkpointing that fit (a resume keeps the run's own)."""
    cfg = run.cfg
    if cfg.fit == "off":
        return cfg
    if cfg.fit != "auto":
        raise UserError(f"--fit must be off or auto, got '{cfg.fit}'")
    from florence_kit.model.memory import FitRequest, fit_auto
    from florence_kit.train.checkpoints import fit_of_checkpoint

    kept = set(run.report.keep)
    reused = fit_of_checkpoint(cfg, run.resume_from, run.say) if run.resume_from is not None else None
    if reused is not None:
        return reused
    texts = (row for row in run.data.dataset.texts() if row[0] in kept)
    chosen = fit_auto(view(FitRequest, cfg), run.model, run.processor, texts, run.say)
    return replace(cfg, batch_size=chosen.micro_batch, grad_accum=chosen.grad_accum,
                   gradient_checkpointing=chosen.checkpointing)


def apply_training_mode(run: Run, chosen_optim: str | None, chosen_lr: float | None) -> None:
    """LoRA adapters where the mode has them (seeded), the mode's frozen parts, and what trains, said once."""
    from florence_kit.model.adapters import wrap_lora
    from florence_kit.model.modes import apply_mode, summary, trainable_counts

    cfg = run.cfg
    if run.adapter:
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # LoRA's A matrices start random: the same --seed must give the same run
        run.model = wrap_lora(run.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_vision)
    apply_mode(run.model, cfg.mode, cfg.lora_vision)
    run.counts = trainable_counts(run.model)
    run.say(summary(run.counts))
    if not chosen_optim and cfg.optim != "adamw":
        run.say(f"optimizer: {cfg.optim} (the {cfg.mode} default on this machine; paged needs CUDA)")
    if chosen_lr is None and run.adapter:
        run.say(f"learning rate: {cfg.lr:g} (the {cfg.mode} default; --lr to change)")


def choose_speed(run: Run) -> TrainConfig:
    """``--speed``: the decode-once store, the feature cache and page grouping (train/speed.py), decided on the main
    process (the others follow) and said in one line with ``--attn``'s kernel; ``--resume`` keeps the run's choice."""
    import torch

    from florence_kit.data.prepared import image_keys, pixel_shape
    from florence_kit.model.attention import apply_attn, attn_line, resolve_attn
    from florence_kit.model.modes import frozen_components
    from florence_kit.model.precision import device_facts, resolve_precision
    from florence_kit.train.speed import decide, feature_bytes_per_page, recorded

    cfg = run.cfg
    implementation, why = resolve_attn(cfg.attn, cuda=torch.cuda.is_available(),
                                       precision=resolve_precision(cfg.precision, device_facts()))
    apply_attn(run.model, implementation)
    decision: list[Any] = [None]
    if run.main:
        kept = run.report.keep

        def pages() -> int:
            keys = image_keys(run.data.dataset)
            run.data.dataset.image_keys_memo = keys  # the store reads them back instead of hashing every page again
            return len({keys[i] for i in kept})

        height, width = pixel_shape(run.processor.image_processor)
        # under FSDP the frozen tower runs inside the sharded model, not beside it: nothing to cache
        no_cache = "under --strategy fsdp the frozen tower runs inside the sharded model" if run.strategy == "fsdp" \
            else None
        decision = [decide(cfg, frozen_vision="vision" in frozen_components(cfg.mode, cfg.lora_vision),
                           pages=pages, pixel_size=(height, width),
                           feature_page_bytes=feature_bytes_per_page(run.model, height, width),
                           resumed=recorded(cfg, run.resume_from) if run.resume_from is not None else None,
                           no_cache=no_cache)]
    if run.procs.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decision = broadcast_object_list(decision)
    chosen, line, record = decision[0]
    line = f"{line}; {attn_line(cfg.attn, implementation, why)}"
    run.say(line)
    run.speed = {**record, "decision": line, "attention": implementation}
    return chosen


def check_resume_settings(run: Run) -> None:
    """The checkpoint's settings against this run's, with the process count and precision the loop will have."""
    from types import SimpleNamespace

    from florence_kit.model.precision import ACCELERATE_NAME, device_facts, resolve_precision
    from florence_kit.train.accelerator import run_fingerprint
    from florence_kit.train.checkpoints import check_settings

    precision = ACCELERATE_NAME[resolve_precision(run.cfg.precision, device_facts())]
    planned = SimpleNamespace(num_processes=run.procs.num_processes, mixed_precision=precision)
    assert run.resume_from is not None
    check_settings(run.resume_from, run_fingerprint(run.cfg, planned))


def start_run_folder(run: Run) -> None:
    """metrics.jsonl started (or cut back to the checkpoint's step when resuming), config.yaml written."""
    from florence_kit.train.runfolder import RunFolder

    out, report = run.out, run.report
    run.run_info = {"task_origin": run.data.origin, "examples": len(report.keep), "dropped": len(report.too_long),
                    **({"mix": run.data.mix} if run.data.mix else {}), "speed": run.speed}
    if run.resume_from is not None:
        run.start_step = TrainState.from_file(run.resume_from / "trainer_state.json")[0].step
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        if run.resume_from is not None:
            RunFolder(out).restart_metrics(run.start_step, run.resume_from)
            run.say(f"resuming from {run.resume_from} (step {run.start_step})")
        else:
            RunFolder(out).start_metrics()
            for stale in ("checkpoints", "best", "tensorboard"):  # an earlier run's, in a folder reused by --overwrite
                shutil.rmtree(out / stale, ignore_errors=True)
        write_config(run.cfg, out, run.run_info)
    run.procs.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# Train


def train(run: Run, quiet: bool) -> Outcome:
    """The loop under a progress bar; Ctrl-C stops it after the step in progress (every process agrees)."""
    from florence_kit.train.progress import StepProgress
    from florence_kit.train.runfolder import ImageGuard, RunFolder, StepInterrupt, stop_at_step_end

    cfg = run.cfg
    evaluator = make_evaluator(run.tasks[0], cfg, run.processor) if cfg.eval_every else None
    rows = ImageGuard(run.data.dataset, run.report.keep, skip=cfg.skip_bad_images)
    state, start, interrupted = TrainState(), time.perf_counter(), None
    samples_per_step = cfg.batch_size * cfg.grad_accum * run.procs.num_processes
    with StepProgress(f"fine-tuning {run.data.name} ({cfg.mode})", samples_per_step, quiet or not run.main,
                      log_every=cfg.log_every, print_fn=run.say) as bar, stop_at_step_end() as stop:
        try:
            steps, loss = train_loop(
                run.model, run.processor, rows, cfg, RunFolder(run.out),
                on_step=bar.update, collate_truncate=cfg.too_long == "truncate",
                evaluator=evaluator, on_best=lambda model, step, value: save_best_of(run, model, step, value),
                resume_from=run.resume_from, state=state, stop_requested=lambda: stop.requested,
                on_shares=lambda strategy, ranks: record_strategy(run, strategy, ranks),
            )
        except StepInterrupt as exc:
            interrupted = exc
            steps, loss = exc.step, bar.last.get("loss", float("nan"))
    return Outcome(steps, loss, time.perf_counter() - start, state, rows.skipped, interrupted)


def record_strategy(run: Run, strategy: str, ranks: list[dict[str, int]]) -> None:
    """One line on how the run is distributed and what each process holds; config.yaml's ``run.strategy``."""
    from florence_kit.train.sharding import strategy_line

    backend = str(getattr(run.procs, "backend", None) or "none")
    if strategy != "none":
        run.say(strategy_line(strategy, backend, ranks, run.launcher_fsdp))
    run.run_info["strategy"] = {"name": strategy, "processes": len(ranks), "backend": backend, "ranks": ranks,
                                **({"asked_by": "accelerate launch --use_fsdp"} if run.launcher_fsdp else {})}
    if run.main:
        write_config(run.cfg, run.out, run.run_info)


# ---------------------------------------------------------------------------------------------
# Save


def save(run: Run, outcome: Outcome) -> TrainResult:
    """The model swapped in whole, config.yaml with the run's facts, the model card; Ctrl-C said last."""
    from florence_kit.common.errors import RunInterrupted
    from florence_kit.train.card import write_card
    from florence_kit.train.config import options_dict
    from florence_kit.train.runfolder import save_atomically

    skipped, interrupted = outcome.skipped_images, outcome.interrupted
    if skipped:
        run.say(f"warning: skipped {len(skipped)} row(s) with unreadable images "
                f"(rows {', '.join(map(str, skipped[:10]))}{', ...' if len(skipped) > 10 else ''})")
    run.run_info.update(steps=outcome.steps, final_loss=outcome.loss, skipped_bad_images=len(skipped))
    if interrupted:
        run.run_info.update(interrupted_at_step=interrupted.step, total_steps=interrupted.total)
    from florence_kit.train.sharding import plain_model

    model = plain_model(run.model)  # under FSDP every process helps gather the whole weights to the main one
    if run.main:
        save_atomically(run.out, lambda folder: save_model(run, model, folder))
        write_config(run.cfg, run.out, run.run_info)
        write_card(run.out, options_dict(run.cfg), run.run_info)
    run.procs.wait_for_everyone()
    if interrupted:
        raise RunInterrupted(
            f"interrupted (Ctrl-C) at step {interrupted.step} of {interrupted.total}; the model at that step, "
            f"config.yaml, README.md and metrics.jsonl are saved in '{run.out}'"
        )
    return TrainResult(run.out, outcome.steps, outcome.loss, outcome.seconds, len(run.report.too_long), run.counts,
                       outcome.state, run.start_step)


def save_model(run: Run, model: Any, folder: Path) -> None:
    """An adapter run saves its adapter (on the base it names); the other modes a whole checkpoint."""
    from florence_kit.model.adapters import base_reference, save_adapter
    from florence_kit.model.checkpoint_io import save_checkpoint

    if run.adapter:
        save_adapter(model, run.processor, folder, base_reference(run.cfg.model))
    else:
        save_checkpoint(model, run.processor, folder)


def save_best_of(run: Run, model: Any, step: int, value: float) -> None:
    save_best(model, run.out, step, run.tasks[0].metric, value, lambda m, folder: save_model(run, m, folder))


# ---------------------------------------------------------------------------------------------
# Helpers of the steps above


def prepare_run_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Check the output folder; returns the checkpoint to resume from, if any.

    Resuming into the run folder the checkpoint belongs to needs no ``--overwrite``.
    """
    from florence_kit.train.checkpoints import resolve_resume

    if not cfg.resume:
        check_output_dir(out, cfg.overwrite)
        return None
    checkpoint = resolve_resume(cfg.resume, out)
    if checkpoint.resolve().parent.parent != out.resolve():
        check_output_dir(out, cfg.overwrite)
    return checkpoint


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
    from florence_kit.data.dataset import load_split
    from florence_kit.evaluate.scoring import answer_and_score

    split = load_split(task, cfg.dataset, task.dataset.eval_split)
    if cfg.eval_max_samples:
        split = split.select(range(min(cfg.eval_max_samples, len(split))))

    def run(model: Any) -> tuple[str, float]:
        metrics = answer_and_score(model, processor, task, split, batch_size=cfg.batch_size, show_progress=False,
                           thumbnail_size=None).metrics
        value = metrics[metrics["metric"]]
        if value is None:
            raise UserError(f"--eval-every: the '{task.dataset.eval_split}' split has no references to score")
        return metrics["metric"], float(value)

    return run


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
