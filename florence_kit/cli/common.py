"""What every command shares: the error boundary and common options."""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable, Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from florence_kit.common.errors import RunInterrupted, UserError
from florence_kit.model.attention import ATTN_CHOICES
from florence_kit.tasks.region_block import BoxFormat
from florence_kit.train.speed import SPEEDS

F = TypeVar("F", bound=Callable[..., Any])
console = Console()
err_console = Console(stderr=True)


def choices(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum of the values a library module owns, for Typer: the CLI lists no choice of its own.

    Members are named as Python allows ('paged-adamw8bit' → ``paged_adamw8bit``); each keeps its value.
    """
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


Attn = choices("Attn", ATTN_CHOICES)
Speed = choices("Speed", SPEEDS)

# --- options several commands share: one type each, the same help wherever they appear ---
AttnOption = Annotated[
    Attn,
    typer.Option(help="Attention kernel of the language model: auto (flash-attn 2 where installed, on a CUDA GPU in "
                 "bf16/fp16; else sdpa), sdpa, flash (pip install \"florence-kit[flash]\") or eager."),
]
TasksDirOption = Annotated[
    list[Path] | None,
    typer.Option("--tasks-dir", help="Extra folder of task files (repeatable; also FLORENCE_KIT_TASKS_PATH)."),
]
MODEL_HELP = "Run or checkpoint folder, hub id, or base/large/base-ft/large-ft."  # also serve's MODEL argument
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
TaskOption = Annotated[str | None, typer.Option(
    "--task", help="Task whose prompt and generation settings to use; default: the task the run or export was made "
    "for, else docvqa.")]
DatasetOption = Annotated[
    str | None, typer.Option(help="Hub id, save_to_disk folder, or parquet/JSONL files; default: the task's.")
]
StreamingOption = Annotated[
    bool, typer.Option(help="Stream a hub dataset instead of downloading it whole (needs --max-samples).")
]
MaxSamplesOption = Annotated[int | None, typer.Option(help="Use only the first N rows of the split.")]
BoxFormatOption = Annotated[
    BoxFormat | None,
    typer.Option(help="Region tasks: how the data writes boxes (default: the task's, xywh as COCO)."),
]
NumWorkersOption = Annotated[
    int, typer.Option(help="DataLoader workers that decode images and run the processor (0: in-process).")
]
SeedOption = Annotated[
    int, typer.Option(help="Seed of the command's random draws (weights, data, data order, dropout).")
]
OverwriteOption = Annotated[bool, typer.Option(help="Allow writing into a non-empty output folder.")]
QuietOption = Annotated[
    bool, typer.Option(help="No progress bar: plain log lines (also when stdout is not a terminal).")
]
# generation: eval and predict
NumBeamsOption = Annotated[int | None, typer.Option(help="Beam search width; default: the task's (1).")]
MaxNewTokensOption = Annotated[int | None, typer.Option(help="Answer length cap; default: the task's.")]
GenerateBatchSizeOption = Annotated[
    int, typer.Option(help="Examples per generate() call (sorted by prompt length; same answers as 1).")
]
QuestionOption = Annotated[str | None, typer.Option(help="The question (for tasks whose prompt has one).")]
# predict over many images
PredictOutputOption = Annotated[Path | None, typer.Option(
    "--output", help="Answer every input into this file: .jsonl (default) or .parquet, one record per input in input "
    "order; with --format, a dataset folder. The same command again continues where a stopped run ended.")]


class LabelFormat(str, Enum):
    jsonl = "jsonl"
    coco = "coco"
    yolo = "yolo"
    florence_jsonl = "florence-jsonl"


PredictFormatOption = Annotated[LabelFormat, typer.Option(
    "--format", help="jsonl: records (or .parquet by --output's suffix); coco, yolo, florence-jsonl: a dataset "
    "folder `finetune --dataset` trains on (auto-labelling).")]
PredictOverwriteOption = Annotated[
    bool, typer.Option(help="Replace an --output another model, task or prompt wrote.")
]
PredictDatasetOption = Annotated[str | None, typer.Option(
    "--dataset", help="Answer a dataset's images instead: a save_to_disk folder, parquet/JSONL with an image column, "
    "or a hub id.")]
PredictStreamingOption = Annotated[
    bool, typer.Option("--streaming", help="Stream a hub --dataset instead of downloading it whole.")
]
SplitOption = Annotated[str | None, typer.Option(help="Split of --dataset; default: train, else its first split.")]
ImageColumnOption = Annotated[str, typer.Option(help="Column of --dataset that holds the images.")]
QuestionColumnOption = Annotated[
    str | None, typer.Option(help="Column of --dataset that holds each row's question (else --question for all).")
]
CopyImagesOption = Annotated[bool, typer.Option(help="--format: copy the images into OUT (default: hard links).")]


def model_task(model: str | None, tasks_dirs: list[Path], fallback: str = "docvqa") -> str:
    """The one task a run folder was trained for (its config.yaml) or an ONNX export was made for, else
    ``fallback``: ``predict`` and ``serve`` without --task ask the model what it learned, in its own prompt."""
    from florence_kit.model.onnx_runtime import export_info, is_onnx_export
    from florence_kit.tasks.registry import resolve_tasks
    from florence_kit.train.runfolder import RunFolder

    path = Path(model).expanduser() if model else None
    if path is None or not path.is_dir():
        return fallback
    own = (RunFolder(path).tasks() if not is_onnx_export(path)
           else {"task": export_info(path).get("task"), "tasks_dirs": []})
    task = own.get("task")
    if not isinstance(task, str) or not task:
        return fallback
    try:  # a mix or a group has no single prompt: the fallback then, as before
        return task if len(resolve_tasks(task, [*tasks_dirs, *own.get("tasks_dirs", [])])) == 1 else fallback
    except UserError:
        return fallback


def quiet_libraries() -> None:
    """Our own progress bars and messages are what users read; silence the libraries' chatter."""
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)


def one_line(exc: BaseException) -> str:
    """The message alone: a UserError re-raised by a DataLoader worker carries the worker's traceback."""
    text = str(exc)
    if "Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


# A DDP process other than the main one waits this long before printing its error: an error every process
# raises (a non-empty --output-dir, a bad option) is then printed by the main process alone, since the launcher
# (torchrun / accelerate launch) stops the other processes as soon as one exits. An error of its own is still shown.
ECHO_DELAY_S = 3.0


def print_error(message: str) -> None:
    """One red line on stderr; once per run under DDP, not once per process."""
    if os.environ.get("RANK", "0") != "0":
        time.sleep(ECHO_DELAY_S)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def user_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and its exit code (2; 130 for Ctrl-C), no traceback.

    A full disk is not a bug either: it gets the same one line.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if isinstance(exc, RunInterrupted) and os.environ.get("RANK", "0") != "0":
                raise typer.Exit(exc.exit_code) from None  # every DDP process stops at the same step: one says so
            # escaped: a message such as "pip install 'florence-kit[ui]'" is not Rich markup
            print_error(escape(one_line(exc)))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print_error(f"disk full ({escape(str(exc))}); free some space and run again")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
