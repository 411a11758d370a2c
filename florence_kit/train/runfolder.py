"""What keeps a run folder whole: atomic saves, bad images skipped or named, and Ctrl-C that saves first.

- The final model is written to a hidden temporary folder and moved in file by file (``os.replace`` is
  atomic), so a full disk or a crash never leaves a half-written ``model.safetensors`` behind or
  destroys an earlier run's weights.
- A row whose image cannot be decoded stops the run with its row and file named, or with
  ``--skip-bad-images`` is left out before the first step (as ``--prepare-data`` leaves it out) and counted.
- The first Ctrl-C lets the current optimizer step finish, then the run saves and exits (code 130);
  a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from florence_kit.common.errors import BadImageError, UserError
from florence_kit.data.dataset import image_file

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
    if (out / "config.yaml").is_file():
        return (f"--output-dir '{out}' is not empty: it holds an earlier run; pass --overwrite to replace it or "
                "choose another folder")
    return (f"--output-dir '{out}' is not empty and is not a florence-kit run folder; pass --overwrite to write "
            "into it anyway or choose another folder")
