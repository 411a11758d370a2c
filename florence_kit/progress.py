"""A rich progress bar for optimizer steps: loss, lr, samples/s and ETA; silent with --quiet."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    """Context manager whose ``update(step, total, loss, lr)`` is the trainer's per-step callback."""

    def __init__(self, description: str, samples_per_step: int, quiet: bool = False) -> None:
        self.samples_per_step = samples_per_step
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.1f} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=quiet,
        )
        self.description = description
        self.task_id: Any = None
        self.start = 0.0

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        self.task_id = self.progress.add_task(self.description, total=None, loss=float("nan"), lr=0.0, rate=0.0)
        self.start = time.perf_counter()
        return self

    def update(self, step: int, total: int, loss: float, lr: float) -> None:
        rate = step * self.samples_per_step / max(time.perf_counter() - self.start, 1e-9)
        self.progress.update(self.task_id, completed=step, total=total, loss=loss, lr=lr, rate=rate)

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
