"""``florence-kit finetune TASK``: fine-tune Florence-2 on a task and save a checkpoint folder.

The parameters are named as :class:`~florence_kit.train.config.TrainConfig`'s fields, which they fill by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import (
    Attn,
    AttnOption,
    BoxFormatOption,
    DatasetOption,
    MaxSamplesOption,
    ModelOption,
    NumWorkersOption,
    OverwriteOption,
    QuietOption,
    SeedOption,
    Speed,
    StreamingOption,
    TasksDirOption,
    choices,
    console,
    user_errors,
)
from florence_kit.data.collate import TOO_LONG_CHOICES
from florence_kit.model.adapters import OPTIMIZERS
from florence_kit.model.modes import Mode
from florence_kit.model.precision import Precision
from florence_kit.train.config import FITS, SCHEDULES, TrainConfig, TrainResult
from florence_kit.train.sharding import STRATEGIES
from florence_kit.train.trackers import TRACKERS

Schedule = choices("Schedule", SCHEDULES)
ReportTo = choices("ReportTo", TRACKERS)
Optim = choices("Optim", OPTIMIZERS)
Fit = choices("Fit", FITS)
Strategy = choices("Strategy", STRATEGIES)
TooLong = choices("TooLong", TOO_LONG_CHOICES)


@user_errors
def finetune(
    ctx: typer.Context,
    task: Annotated[
        str | None,
        typer.Argument(help="Task name, a comma list of tasks or a group (e.g. cauldron): several are mixed; "
                       "optional with --config."),
    ] = None,
    model: ModelOption = "base",
    dataset: DatasetOption = None,
    mode: Annotated[Mode, typer.Option(help="Which parts train.")] = Mode.full,
    output_dir: Annotated[Path, typer.Option(help="Run folder: final model, config.yaml, metrics.jsonl.")] = Path(
        "runs/finetune"
    ),
    epochs: Annotated[float, typer.Option(help="Passes over the training split.")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak learning rate. Default: 1e-5 (full, frozen-encoder), 1e-4 (lora, qlora)."),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on norms/biases).")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 0,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate decay after warmup.")] = Schedule.linear,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping (0 = off).")] = 1.0,
    seed: SeedOption = 0,
    too_long: Annotated[
        TooLong, typer.Option(help="Examples longer than the model's positions: drop, truncate or error.")
    ] = TooLong.drop,
    max_target_length: Annotated[
        int | None, typer.Option(help="Grow the model's position tables to N (e.g. 2048, 4096) before training, for "
                                 "targets longer than its 1024 positions (docs/long-outputs.md).")
    ] = None,
    max_samples: MaxSamplesOption = None,
    num_workers: NumWorkersOption = 0,
    overwrite: OverwriteOption = False,
    # --- tasks ---
    streaming: StreamingOption = False,
    mix_weights: Annotated[
        str | None,
        typer.Option(help="Sampling weights of a mix ('2,1' or 'cauldron/ai2d=2'); default: task sizes."),
    ] = None,
    # --- lora ---
    lora_r: Annotated[int, typer.Option(help="LoRA rank (lora/qlora).")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA scaling alpha (update scaled by alpha/r).")] = 32,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input.")] = 0.05,
    lora_vision: Annotated[
        bool, typer.Option(help="Also adapt the vision tower (attention and MLP) with LoRA (lora/qlora).")
    ] = False,
    optim: Annotated[
        Optim | None,
        typer.Option(help="Optimizer; 8-bit ones need bitsandbytes. Default: adamw (qlora: paged-adamw8bit on "
                     "CUDA, adamw8bit elsewhere)."),
    ] = None,
    # --- memory ---
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass (BART layers and DaViT blocks).")
    ] = False,
    fit: Annotated[
        Fit, typer.Option(help="auto: pick micro-batch × accumulation = --batch-size, and checkpointing, to fit "
                          "this machine's memory (see `florence-kit plan`).")
    ] = Fit.off,
    # --- runtime ---
    precision: Annotated[
        Precision, typer.Option(help="auto: bf16 on GPUs that have it, fp16 + loss scaling on older GPUs, fp32 on CPU.")
    ] = Precision.auto,
    strategy: Annotated[
        Strategy, typer.Option(help="Under torchrun / accelerate launch: ddp (a whole copy per process) or fsdp "
                               "(FSDP2: parameters, gradients and optimizer state sharded per block); auto: ddp, or "
                               "fsdp when accelerate launch --use_fsdp asked for it. One process: auto only.")
    ] = Strategy.auto,
    save_every: Annotated[
        int, typer.Option(help="Resumable checkpoint every N steps, in OUTPUT_DIR/checkpoints (0 = off).")
    ] = 0,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep the last K checkpoints.")] = 2,
    resume: Annotated[
        str | None, typer.Option(help="Continue exactly: 'latest' (of --output-dir) or a checkpoints/step-N folder.")
    ] = None,
    eval_every: Annotated[
        int, typer.Option(help="Score the task's eval split every N steps; the best model goes to OUTPUT_DIR/best.")
    ] = 0,
    eval_max_samples: Annotated[int | None, typer.Option(help="Eval rows scored by --eval-every (first N).")] = 200,
    early_stopping_patience: Annotated[
        int, typer.Option(help="Stop after N evaluations without improvement (0 = never).")
    ] = 0,
    # --- trainspeed ---
    speed: Annotated[
        Speed, typer.Option(help="auto: decode pages once, and with a frozen vision tower cache its features and "
                            "group a page's questions, where the disk has room (one line says what and why; "
                            "docs/speed.md); off: the plain per-batch path. Each --[no-]switch below wins.")
    ] = Speed.auto,
    attn: AttnOption = Attn.auto,
    cache_vision_features: Annotated[
        bool | None,
        typer.Option("--cache-vision-features/--no-cache-vision-features",
                     help="Frozen vision tower only: run it once per distinct image and reuse its output (fp16, on "
                     "disk, memory-mapped). Default: --speed decides."),
    ] = None,
    vision_cache_dir: Annotated[
        Path | None, typer.Option(help="Where --cache-vision-features keeps features; default: <output-dir>/"
                                  "vision_cache. Shareable across runs of the same model.")
    ] = None,
    prepare_data: Annotated[
        bool | None,
        typer.Option("--prepare-data/--no-prepare-data",
                     help="Decode and resize each distinct image once (worker processes, uint8 on disk) and tokenise "
                     "once, instead of running the processor on every batch of every epoch. Default: --speed decides."),
    ] = None,
    prepare_dir: Annotated[
        Path | None, typer.Option(help="Where --prepare-data keeps its resized pixels; default: <output-dir>/prepared. "
                                  "Shareable: a later run over the same images reads the store back.")
    ] = None,
    group_by_image: Annotated[
        bool | None,
        typer.Option("--group-by-image/--no-group-by-image",
                     help="Put the questions of one page in one batch (with --cache-vision-features the page goes "
                     "through the vision tower once, even in the first epoch). Default: --speed decides."),
    ] = None,
    group_by_length: Annotated[
        bool, typer.Option(help="Batches of similar length, less padding (needs --prepare-data).")
    ] = False,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile each DaViT block and BART layer (regional): the first "
                           "step compiles (seconds to a minute), later steps run fused kernels.")
    ] = False,
    # --- run folder ---
    config: Annotated[
        Path | None,
        typer.Option(help="YAML of options (a run's config.yaml works); options typed here override it."),
    ] = None,
    report_to: Annotated[ReportTo, typer.Option(help="Experiment tracker (optional extra).")] = ReportTo.none,
    push_to_hub: Annotated[
        str | None, typer.Option(help="Upload model, processor and card to this hub repo after training.")
    ] = None,
    skip_bad_images: Annotated[
        bool, typer.Option(help="Skip rows whose image cannot be decoded (counted and reported) instead of stopping.")
    ] = False,
    # --- regions ---
    box_format: BoxFormatOption = None,
    quiet: QuietOption = False,
    tasks_dirs: TasksDirOption = None,
) -> None:
    """Fine-tune Florence-2 on TASK and save the model, processor, config and metrics log.

    Examples:

      florence-kit finetune docvqa --mode frozen-encoder --model base

      florence-kit finetune docvqa --mode lora --lora-r 16 --output-dir runs/lora

      florence-kit finetune docvqa --model ./tiny --dataset ./my_docvqa --max-steps 100 --output-dir runs/a

      florence-kit finetune cauldron/ai2d,cauldron/chartqa --mix-weights 2,1 --streaming --max-samples 5000

      florence-kit finetune --config runs/a/config.yaml --output-dir runs/b

      florence-kit finetune docvqa --save-every 500 --output-dir runs/a  (then, after a crash: --resume latest)

      accelerate launch --num_processes 2 -m florence_kit.cli finetune docvqa --batch-size 4  (DDP, 2 GPUs)

      torchrun --nproc-per-node 2 -m florence_kit.cli finetune docvqa --strategy fsdp  (sharded, CPU or GPU)
    """
    from florence_kit.train.config import apply_config_file, config_from_options
    from florence_kit.train.recipe import finetune as run

    cfg = config_from_options(ctx.params)  # every parameter named as a TrainConfig field; --config, --quiet are not
    if config is not None:
        cfg = apply_config_file(cfg, config, ctx)
    if cfg.push_to_hub:
        from florence_kit.present.hub import check_can_push

        check_can_push(cfg.push_to_hub)  # before hours of training, not after
    result = run(cfg, quiet=quiet, print_fn=console.print)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _print_outcome(result, cfg)


def _print_outcome(result: TrainResult, cfg: TrainConfig) -> None:
    """What the run did: skipped steps, the best evaluation, an early stop, where the model is; then the upload."""
    state = result.state
    if state.nonfinite_steps:
        console.print(f"[yellow]warning:[/] {state.nonfinite_steps} step(s) skipped: the loss was NaN/inf")
    if state.best_step is not None:
        console.print(f"best eval score {state.best_metric:.4f} at step {state.best_step} (model in best/)")
    if state.stopped_early:
        console.print(f"stopped early: no improvement in {cfg.early_stopping_patience} evaluations")
    console.print(
        f"[green]done:[/] {result.steps} steps"
        + (f" ({result.steps - result.start_step} after resuming at step {result.start_step})" if result.start_step
           else "")
        + f" in {result.seconds:.1f}s, final loss {result.final_loss:.4f}; "
        f"model saved to {result.output_dir}"
    )
    if cfg.push_to_hub:
        from florence_kit.present.hub import push_run

        console.print(f"pushed to {push_run(result.output_dir, cfg.push_to_hub)}")
