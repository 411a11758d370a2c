"""Load a dataset source and map its rows to examples with the task's column mapping.

A source is a hub id, a folder written by ``datasets.save_to_disk``, a folder of parquet / JSONL
files (splits inferred from file names, as ``datasets`` does), or a single parquet / JSONL file.
Every row becomes an :class:`Example`: an RGB image, the rendered prompt, the training target and
the references the metric scores against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from florence_kit.errors import BadImageError, UserError
from florence_kit.task import TaskSpec, template_fields

TABULAR_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


@dataclass
class Example:
    """One training / evaluation example, independent of the dataset's schema."""

    id: str
    image: Image.Image
    prompt: str
    target: str | None
    references: list[str]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, RGBA, CMYK, P, I;16, I, F) to RGB; transparency is laid on white like paper."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().astype(np.uint8), "L")
    elif image.mode in {"I", "F"}:
        arr = np.asarray(image, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        arr = arr * (255.0 / top) if top > 255 else arr
        image = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" or (image.mode in {"L", "RGB"} and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "La", "RGBa", "PA"}:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Loading sources


def _split_from_filename(path: Path) -> str:
    stem = path.stem.lower()
    for split, keys in (("validation", ("val", "dev")), ("test", ("test",)), ("train", ("train",))):
        if any(k in stem for k in keys):
            return split
    return "train"


def _hub_error(source: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return UserError(
        f"could not load dataset '{source}' from the hub ({type(exc).__name__}: {first}). "
        "If this machine is offline, pass a local copy with --dataset DIR "
        "(a save_to_disk folder, or parquet/JSONL files)"
    )


def load_source(source: str, name: str | None = None, streaming: bool = False) -> Any:
    """A ``DatasetDict`` (or ``Dataset``) from a hub id, a save_to_disk folder or parquet/JSONL files.

    ``streaming`` applies to hub ids only: rows arrive as they are read, nothing is downloaded whole.
    """
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = TABULAR_SUFFIXES.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"dataset file '{path}' is not parquet or JSONL; convert it or pass a folder")
            check_utf8([path])
            ds = datasets.load_dataset(builder, data_files={_split_from_filename(path): str(path)})
            return _resolve_image_paths(ds, path.parent)
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                return datasets.load_from_disk(str(path))
            files = [p for p in path.rglob("*") if p.suffix.lower() in TABULAR_SUFFIXES]
            if not files and not (path / "metadata.jsonl").exists():
                raise UserError(
                    f"folder '{path}' holds no dataset: expected a save_to_disk folder or parquet/JSONL files"
                )
            check_utf8(files)
            return _resolve_image_paths(datasets.load_dataset(str(path)), path)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not read dataset '{source}': {type(exc).__name__}: {exc}") from None
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"dataset path '{source}' does not exist")
    try:
        return datasets.load_dataset(source, name, streaming=streaming)
    except Exception as exc:
        raise _hub_error(source, exc) from None


def check_utf8(files: list[Path]) -> None:
    """JSON text must be UTF-8; ``datasets`` would load other bytes and fail later, on first access."""
    for path in files:
        if path.suffix.lower() not in {".jsonl", ".json"}:
            continue
        with path.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UserError(
                        f"'{path}' line {line_no} is not UTF-8 text (byte 0x{line[exc.start]:02x} at column "
                        f"{exc.start + 1}); re-save the file as UTF-8"
                    ) from None


def _resolve_image_paths(ds: Any, root: Path) -> Any:
    """JSONL / parquet with image *paths*: make them absolute (relative to the data folder) and decode."""
    import datasets

    def fix(split_ds: datasets.Dataset) -> datasets.Dataset:
        for col, feat in split_ds.features.items():
            if isinstance(feat, datasets.Value) and feat.dtype == "string" and col in {"image", "image_path"}:
                split_ds = split_ds.map(lambda r, c=col: {c: str((root / r[c]).resolve()) if r[c] else None})
                split_ds = split_ds.cast_column(col, datasets.Image())
        return split_ds

    if isinstance(ds, datasets.DatasetDict):
        return datasets.DatasetDict({k: fix(v) for k, v in ds.items()})
    return fix(ds)


def load_split(task: TaskSpec, dataset: str | None, split: str, streaming: bool = False) -> Any:
    """One split of the task's data (``dataset`` overrides the task's default source)."""
    import datasets

    source = dataset or task.dataset.path
    ds = load_source(source, task.dataset.name if dataset is None else None, streaming=streaming)
    if isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        return ds
    if split not in ds:
        raise UserError(f"dataset '{source}' has no split '{split}'; available: {', '.join(ds)}")
    return ds[split]


# ---------------------------------------------------------------------------------------------
# Rows → examples


def check_columns(ds: Any, task: TaskSpec, *, with_target: bool, source: str = "dataset") -> None:
    """A missing column is an error naming it, the columns present, and the fix."""
    missing = [c for c in task.required_columns(with_target=with_target) if c not in ds.column_names]
    if missing:
        raise UserError(
            f"{source} lacks column(s) {missing} that task '{task.name}' needs "
            f"(columns present: {', '.join(ds.column_names)}); rename them or adjust the task's mapping"
        )


def _references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return [str(value)]
    return [str(v) for v in value]


def render_texts(task: TaskSpec, row: dict[str, Any], index: int) -> tuple[str, str | None, list[str]]:
    """(prompt, target, references) for one row; target is None when the row has no answer."""
    empty = [f for f in template_fields(task.prompt) if f in row and row[f] is None]
    if empty:
        raise UserError(f"row {index}: column '{empty[0]}' is empty (null); fill it or remove the row")
    try:
        prompt = task.prompt.format(**row)
    except (KeyError, IndexError, AttributeError) as exc:
        raise UserError(f"row {index}: prompt template '{task.prompt}' cannot be filled ({exc!r})") from None
    references = _references(row.get(task.references))
    try:
        target = task.target.format(**row) if references or task.references not in row else None
    except (KeyError, IndexError, TypeError):
        target = None
    return prompt, target, references


def _row_id(task: TaskSpec, row: dict[str, Any], index: int) -> str:
    return str(row[task.id_column]) if task.id_column and task.id_column in row else str(index)


class TaskDataset:
    """Map-style dataset of :class:`Example` over one split; images are decoded on access."""

    def __init__(self, ds: Any, task: TaskSpec, *, with_target: bool) -> None:
        check_columns(ds, task, with_target=with_target)
        self.ds = ds
        self.task = task
        self.with_target = with_target

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Example:
        try:
            row = self.ds[int(index)]
        except Exception as exc:  # decoding happens here: a corrupt or missing image file
            raise BadImageError(
                f"row {index}: image cannot be read ({type(exc).__name__}: {exc}); fix or remove that row"
            ) from None
        image = row[self.task.image_column]
        if isinstance(image, list):  # multi-image schemas: the first image is the page
            image = image[0] if image else None
        if not isinstance(image, Image.Image):
            raise BadImageError(
                f"row {index}: column '{self.task.image_column}' holds no image ({type(image).__name__})"
            )
        try:
            image = to_rgb(image)
        except Exception as exc:
            raise BadImageError(f"row {index}: image cannot be decoded ({exc}); fix or remove that row") from None
        prompt, target, refs = render_texts(self.task, row, index)
        if self.with_target and target is None:
            raise UserError(f"row {index}: no answer in column '{self.task.references}' to train on")
        return Example(_row_id(self.task, row, index), image, prompt, target, refs)

    def texts(self) -> Iterator[tuple[int, str, str | None]]:
        """(index, prompt, target) for every row without decoding images: the length preflight's input."""
        text_only = self.ds.remove_columns([self.task.image_column])
        for index, row in enumerate(text_only):
            prompt, target, _ = render_texts(self.task, row, index)
            yield index, prompt, target
