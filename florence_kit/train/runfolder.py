"""The run folder: :class:`RunFolder` reads and writes its files; atomic saves, bad images, Ctrl-C that saves first.

- :class:`RunFolder` is the one place that knows the run's own files: ``config.yaml`` (every option and the
  run's facts), ``metrics.jsonl`` (one JSON record a line) and the model card ``README.md``. Every other
  module asks it for them, so the names and formats are written here once.
- The final model is written to a hidden temporary folder and moved in file by file (``os.replace`` is
  atomic), so a full disk or a crash never leaves a half-written ``model.safetensors`` behind or
  destroys an earlier run's weights.
- A row whose image cannot be decoded stops the run with its row and file named, or with
  ``--skip-bad-images`` is left out before the first step (as ``--prepare-data`` leaves it out) and counted.
- The first Ctrl-C lets the current optimizer step finish, then the run saves and exits (code 130);
  a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florence_kit.common.errors import BadImageError, UserError
from florence_kit.data.dataset import image_file

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CARD_FILE = "README.md"
CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints/step-N


@dataclass(frozen=True)
class RunFolder:
    """A fine-tuning run's output folder and its own files: what it was run with, what it logged, its card."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str (a hub id or a CLI argument) is accepted too

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | str) -> RunFolder:
        """The run that wrote ``checkpoint`` (``<run>/checkpoints/step-N``)."""
        return cls(Path(checkpoint).resolve().parent.parent)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def card_file(self) -> Path:
        return self.path / CARD_FILE

    def is_run(self) -> bool:
        """A run folder is one whose config.yaml was written (at the start of the run, again at its end)."""
        return self.config_file.is_file()

    def has_metrics(self) -> bool:
        return self.metrics_file.is_file()

    # --- config.yaml ---

    def config(self) -> dict[str, Any]:
        """The recorded options and facts; empty where there is no config.yaml or it is no YAML mapping."""
        import yaml

        if not self.config_file.is_file():
            return {}
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def write_config(self, data: dict[str, Any]) -> None:
        """``data`` as YAML in its own order, swapped in whole so a crash leaves the earlier file, never half a one."""
        import yaml

        tmp = self.path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
        tmp.replace(self.config_file)

    def tasks(self) -> dict[str, Any]:
        """The run's task selection and those of its task folders that still exist; empty for no run."""
        data = self.config()
        if not data:
            return {}
        dirs = [Path(d) for d in data.get("tasks_dirs") or [] if Path(d).is_dir()]
        return {"task": data.get("task"), "tasks_dirs": dirs}

    # --- metrics.jsonl ---

    def start_metrics(self) -> None:
        """An empty log: a new run (or one started over with --overwrite) logs from its first step."""
        self.metrics_file.write_text("")

    def restart_metrics(self, step: int, checkpoint: Path) -> None:
        """On resume, drop records past the checkpoint's step (the resumed run writes them again) and mark it."""
        log = self.metrics_file
        kept = []
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        kept.append(json.dumps({"step": step, "event": "resume", "checkpoint": str(checkpoint)}))
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("\n".join(kept) + "\n")
        tmp.replace(log)

    @contextmanager
    def metrics_log(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        """Append records to the log while a run trains, one JSON line each, flushed so a kill loses no step."""
        with self.metrics_file.open("a") as log:

            def write(record: dict[str, Any]) -> None:
                log.write(json.dumps(record) + "\n")
                log.flush()

            yield write

    def metrics(self) -> list[dict[str, Any]]:
        """The log's records in order; a torn line (a run killed mid-write) is skipped, not fatal."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    # --- README.md ---

    def write_card(self, text: str) -> Path:
        """The model card (train/card.py writes its text); the hub shows it as the repo's page."""
        self.card_file.write_text(text)
        return self.card_file


# What makes a folder one model or the other: an earlier run's left beside the new ones (--overwrite of a full run
# by a lora run, or the reverse) would be loaded instead of them (a config.json makes a folder a full checkpoint).
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
               "adapter_config.json", "adapter_model.safetensors")


def save_atomically(out: Path, save: Callable[[Path], Any]) -> None:
    """Run ``save(folder)`` (a checkpoint or adapter save) into ``out`` without ever leaving a partial file there.

    Model files of an earlier run that this save did not write are removed once the new ones are in place.
    """
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=out))
    try:
        save(tmp)
        saved = {path.name for path in tmp.iterdir()}
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
        for pattern in MODEL_FILES:
            for stale in out.glob(pattern):
                if stale.name not in saved:
                    stale.unlink()
    except OSError as exc:
        raise UserError(
            f"could not save the model to '{out}' ({exc.strerror or exc}); nothing there was replaced: "
            "free some space (or fix the folder's permissions) and run again"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ImageGuard:
    """The training rows (``indices`` of a TaskDataset); a bad image is an error, or its rows left out when asked.

    Left out, not replaced: a row replaced by the next readable one was trained on twice an epoch. The rows are
    found before the first step, by :meth:`leave_out_unreadable` or by ``--prepare-data`` (which marks ``bad``),
    the same rows either way, so the epoch's size and order are known up front and ``--resume`` rebuilds them.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], skip: bool) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.skip = skip
        self.bad = bytearray(max(1, len(self.indices)))  # per position, marked by --prepare-data
        self.left_out: list[int] = []

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        index = self.indices[i]
        try:
            return self.dataset[index]
        except BadImageError as exc:
            where = image_file(self.dataset, index)
            hint = ("though it was readable when the rows were checked before training" if self.skip
                    else "or pass --skip-bad-images to skip such rows")
            raise UserError(f"{exc}{f' (file {where})' if where else ''}, {hint}") from None

    def leave_out_unreadable(self, workers: int = 0) -> None:
        """``--skip-bad-images`` without ``--prepare-data``: decode each distinct image once (in ``workers``
        DataLoader processes) and leave out the rows showing one that cannot be read, as ``--prepare-data`` does."""
        from torch.utils.data import DataLoader

        from florence_kit.data.prepared import image_keys

        keys = image_keys(self.dataset)
        first = {keys[index]: index for index in reversed(self.indices)}  # a dataset index showing each image
        checks = DataLoader(_Readable(self.dataset, list(first.values())), batch_size=None, num_workers=workers)
        unreadable = {keys[index] for index, readable in checks if not readable}
        self.left_out += [index for index in self.indices if keys[index] in unreadable]
        self.indices = [index for index in self.indices if keys[index] not in unreadable]
        self.bad = bytearray(max(1, len(self.indices)))
        if not self.indices:
            raise UserError(f"none of the {len(self.left_out)} training rows has a readable image; check the "
                            "dataset's image column")

    @property
    def skipped(self) -> list[int]:
        """Dataset row numbers left out."""
        return [*self.left_out, *(self.indices[p] for p in range(len(self.indices)) if self.bad[p])]


class _Readable:
    """(dataset index, whether its example loads) for each index: the check behind ``leave_out_unreadable``."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, bool]:
        try:
            self.dataset[self.indices[i]]
        except BadImageError:
            return self.indices[i], False
        return self.indices[i], True


class StepInterrupt(Exception):
    """Raised from the per-step callback after Ctrl-C: the step just finished is the last one."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"interrupted at step {step} of {total}")
        self.step, self.total = step, total


class StopFlag:
    requested = False


@contextmanager
def stop_at_step_end() -> Iterator[StopFlag]:
    """First SIGINT: ask the loop to stop after the current step. Second SIGINT: the usual KeyboardInterrupt."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def describe_output_dir(out: Path) -> str:
    """Why an existing non-empty folder is refused: an earlier run or something else."""
    if RunFolder(out).is_run():
        return (f"--output-dir '{out}' is not empty: it holds an earlier run; pass --overwrite to replace it or "
                "choose another folder")
    return (f"--output-dir '{out}' is not empty and is not a florence-kit run folder; pass --overwrite to write "
            "into it anyway or choose another folder")
