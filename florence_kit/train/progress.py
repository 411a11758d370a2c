"""Training progress: a rich bar in a terminal, plain log lines with ``--quiet`` or when stdout is not a terminal.

Both show the same fields: step/total, loss, lr, samples/s, ETA and peak memory (GPU memory allocated
by torch on CUDA, the process's peak RSS otherwise). Plain lines are for log files and CI: one line
every ``log_every`` steps, no cursor tricks.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch (CUDA) or the process's peak resident memory (CPU), in MiB."""
    torch = sys.modules.get("torch")  # never import torch just to measure
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN / unknown
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepProgress:
    """Context manager whose ``update(step, total, loss, lr)`` is the trainer's per-step callback."""

    def __init__(
        self,
        description: str,
        samples_per_step: int,
        quiet: bool = False,
        *,
        log_every: int = 10,
        print_fn: Callable[[str], None] | None = None,
        console: Console | None = None,
    ) -> None:
        self.samples_per_step = samples_per_step
        self.console = console or Console()
        self.plain = quiet or not self.console.is_terminal
        self.log_every = max(1, log_every)
        self.print_fn = print_fn or (lambda line: self.console.print(line, highlight=False, markup=False))
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.1f} samples/s"
                       "  mem {task.fields[mem]:.0f} MiB"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.plain,
        )
        self.description = description
        self.task_id: Any = None
        self.start = 0.0
        self.first_step: int | None = None  # the step before the first one timed here (> 0 after --resume)
        self.last: dict[str, Any] = {}

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        self.task_id = self.progress.add_task(self.description, total=None, loss=float("nan"), lr=0.0, rate=0.0,
                                              mem=0.0)
        self.start = time.perf_counter()
        return self

    def update(self, step: int, total: int, loss: float, lr: float) -> None:
        if self.first_step is None:  # a resumed run starts past step 0: the steps it skips took no time here
            self.first_step = step - 1
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = step - self.first_step
        rate = done * self.samples_per_step / elapsed
        eta = elapsed / done * (total - step) if done > 0 else float("nan")
        mem = peak_memory_mib()
        self.last = {"step": step, "total": total, "loss": loss, "lr": lr, "rate": rate, "eta": eta, "mem": mem}
        self.progress.update(self.task_id, completed=step, total=total, loss=loss, lr=lr, rate=rate, mem=mem)
        if self.plain and (step % self.log_every == 0 or step in (1, total)):
            self.print_fn(self.line())

    def line(self) -> str:
        """One plain log line with every field."""
        s = self.last
        return (f"step {s['step']}/{s['total']}  loss {s['loss']:.4f}  lr {s['lr']:.2e}  {s['rate']:.1f} samples/s"
                f"  eta {format_eta(s['eta'])}  mem {s['mem']:.0f} MiB")

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
