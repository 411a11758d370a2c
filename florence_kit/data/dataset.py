"""Load a dataset source and map its rows to examples with the task's column mapping.

A source is a hub id, a folder written by ``datasets.save_to_disk``, a folder of parquet / JSONL
files (splits inferred from file names, as ``datasets`` does), or a single parquet / JSONL file.
Every row becomes an :class:`Example`: an RGB image, the rendered prompt, the training target and
the references the metric scores against.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from florence_kit.common.errors import BadImageError, UserError, first_line
from florence_kit.data.rows import apply_aliases, explode_index, exploded, map_row, resolve_aliases, tile_images
from florence_kit.tasks.region_block import UNIT_KINDS
from florence_kit.tasks.spec import TaskSpec, template_fields

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
    first = first_line(exc, 200)
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
            splits = annotation_splits(path)
            if splits:
                return load_annotation_splits(splits)
            from florence_kit.data.region_targets import load_region_folder  # COCO / YOLO folders (region tasks)

            regions = load_region_folder(path)
            if regions is not None:
                return regions
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
        if not is_script_error(exc):
            raise _hub_error(source, exc) from None
    try:  # a loading-script dataset (datasets >= 4 runs none): the hub's own parquet conversion of it
        return datasets.load_dataset(source, name, streaming=streaming, revision=PARQUET_REVISION)
    except Exception as exc:
        raise UserError(
            f"dataset '{source}' on the hub is a loading script, which datasets >= 4 no longer runs, and it has no "
            f"parquet conversion ({type(exc).__name__}). Make a local copy once where datasets < 4 is installed "
            f"(load_dataset('{source}', trust_remote_code=True).save_to_disk(DIR)) and pass --dataset DIR"
        ) from None


# Roboflow's Florence-2 export / maestro's layout: DIR/{train,valid,test}/annotations.jsonl, images beside each
ANNOTATION_SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "val": "validation",
                     "test": "test"}
ANNOTATIONS = "annotations.jsonl"


def annotation_splits(path: Path) -> dict[str, Path]:
    """{split: annotations.jsonl} of a Roboflow/maestro folder (``valid`` read as ``validation``); {} otherwise."""
    found: dict[str, Path] = {}
    for folder, split in ANNOTATION_SPLITS.items():
        file = path / folder / ANNOTATIONS
        if file.is_file() and split not in found:
            found[split] = file
    return found


def load_annotation_splits(splits: dict[str, Path]) -> Any:
    """One JSONL per split, each row's ``image`` a file name relative to that split's own folder."""
    import datasets

    check_utf8(list(splits.values()))
    out = {}
    for split, file in splits.items():
        ds = datasets.load_dataset("json", data_files=str(file), split="train")
        out[split] = _resolve_image_paths(ds, file.parent)
    return datasets.DatasetDict(out)


PARQUET_REVISION = "refs/convert/parquet"  # where the hub keeps its parquet conversion of a dataset


def is_script_error(exc: Exception) -> bool:
    """datasets >= 4 refuses hub datasets that are Python loading scripts (HuggingFaceM4/VQAv2 is one)."""
    return "Dataset scripts are no longer supported" in str(exc)


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
    """One split of the task's data (``dataset`` overrides the task's default source).

    With ``streaming`` a local source is read as an ``IterableDataset`` too, so the streamed path
    (what a hub dataset too large to download takes) behaves the same on local data. For a task with
    a config name (``cauldron/ai2d`` reads config ``ai2d``), ``dataset`` may be a local copy of the whole
    hub repository: its ``ai2d/`` folder is used, as the repository lays configs out.
    """
    import datasets

    source = dataset or task.dataset.path
    if dataset and task.dataset.name and (Path(dataset).expanduser() / task.dataset.name).is_dir():
        source = str(Path(dataset).expanduser() / task.dataset.name)  # a local copy of a multi-config repo
    ds = load_source(source, task.dataset.name if dataset is None else None, streaming=streaming)
    split, rows = parse_split(split)
    if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        if split not in ds:
            raise UserError(f"dataset '{source}' has no split '{split}'; available: {', '.join(ds)}")
        ds = ds[split]
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    return slice_rows(ds, *rows) if rows else ds


_SPLIT_SLICE = re.compile(r"^(?P<name>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def parse_split(split: str) -> tuple[str, tuple[int, int | None] | None]:
    """``train`` -> ("train", None); ``train[5000:]`` / ``train[:100]`` -> the split and its row range.

    Row ranges keep evaluation off the rows a run trained on when a dataset has one split only (The
    Cauldron): train on ``--max-samples 5000``, evaluate on ``--split "train[5000:]"``. Only
    non-negative row numbers: a streamed split has no known end.
    """
    if "[" not in split:
        return split, None
    match = _SPLIT_SLICE.match(split.strip())
    if not match:
        raise UserError(f"split '{split}' is not NAME or NAME[start:stop] with row numbers, e.g. train[5000:]")
    start = int(match["start"] or 0)
    stop = int(match["stop"]) if match["stop"] else None
    if stop is not None and stop <= start:
        raise UserError(f"split '{split}' selects no rows")
    return match["name"], (start, stop)


def slice_rows(ds: Any, start: int, stop: int | None) -> Any:
    """Rows ``start:stop`` of a split, streamed (skip/take) or in memory (select)."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        ds = ds.skip(start)
        return ds.take(stop - start) if stop is not None else ds
    return ds.select(range(min(start, len(ds)), min(stop if stop is not None else len(ds), len(ds))))


def cap_rows(ds: Any, max_samples: int | None) -> Any:
    """The first ``max_samples`` rows as a map-style ``Dataset``.

    A streamed split is read only that far (nothing else is downloaded) and kept in memory, because
    training shuffles and evaluation indexes rows; streaming without a cap is refused for that reason.
    """
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        if not max_samples:
            raise UserError("--streaming needs --max-samples N (the first N rows are streamed and kept in memory)")
        rows = list(ds.take(max_samples))
        if not rows:
            raise UserError("the streamed split is empty")
        return datasets.Dataset.from_list(rows, features=ds.features or None)
    if max_samples:
        return ds.select(range(min(max_samples, len(ds))))
    return ds


# ---------------------------------------------------------------------------------------------
# Rows → examples


def check_columns(ds: Any, task: TaskSpec, *, with_target: bool, source: str = "dataset") -> None:
    """A missing column is an error naming it, the columns present, and the fix (aliases count as present)."""
    present = set(ds.column_names) | set(resolve_aliases(task, ds.column_names))
    missing = [c for c in task.required_columns(with_target=with_target) if c not in present]
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


def lookup(row: dict[str, Any], path: str) -> Any:
    """``answers`` or a dotted path into nested data: ``answers.answer`` reads VQAv2's answer dicts,
    stored as a list of dicts or (``datasets.Sequence`` of a dict) as a dict of lists."""
    head, _, rest = path.partition(".")
    value = row.get(head)
    for key in rest.split(".") if rest else []:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list):
            value = [v.get(key) if isinstance(v, dict) else None for v in value]
        else:
            return None
    return value


def render_texts(task: TaskSpec, row: dict[str, Any], index: int) -> tuple[str, str | None, list[str]]:
    """(prompt, target, references) for one row; target is None when the row has no answer."""
    empty = [f for f in template_fields(task.prompt) if f in row and row[f] is None]
    if empty:
        raise UserError(f"row {index}: column '{empty[0]}' is empty (null); fill it or remove the row")
    try:
        prompt = task.prompt.format(**row)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:  # e.g. '{n[0]}' on an int
        raise UserError(f"row {index}: prompt template '{task.prompt}' cannot be filled ({exc!r})") from None
    head = task.references.split(".", 1)[0]
    references = _references(lookup(row, task.references))
    fields = row
    if isinstance(row.get(head), str) and "{" + head + "[" in task.target:
        fields = {**row, head: references}  # "{captions[0]}" reads a single caption string as a 1-item list
    try:
        target = task.target.format(**fields) if references or head not in row else None
    except (KeyError, IndexError, TypeError):
        target = None
    return prompt, target, references


def _row_id(task: TaskSpec, row: dict[str, Any], index: int) -> str:
    return str(row[task.id_column]) if task.id_column and task.id_column in row else str(index)


class TaskDataset:
    """Map-style dataset of :class:`Example` over one split; images are decoded on access.

    With the task's ``explode`` (The Cauldron's ``texts``) every list item is one example, so
    ``len()`` counts turns, not rows; see :mod:`florence_kit.data.rows` for the other row options.
    """

    def __init__(self, ds: Any, task: TaskSpec, *, with_target: bool) -> None:
        check_columns(ds, task, with_target=with_target)
        self.ds = ds
        self.task = task
        self.with_target = with_target
        self.aliases = resolve_aliases(task, ds.column_names)
        self.index = explode_index(task, ds) if task.explode else None
        if task.regions:  # region tasks: class names from the dataset's ClassLabel, bad boxes counted (each
            # texts() pass starts the counts again, so after the length preflight they are one pass's)
            from florence_kit.data.region_targets import RegionCounts, label_names

            self.label_names = label_names(getattr(ds, "features", None), task.regions)
            self.region_counts = RegionCounts()
            self.row_sizes: list[tuple[int, int]] | None = None
            if task.regions["kind"] in UNIT_KINDS:  # one example per object / phrase: indexed once, no pixels read
                from florence_kit.data.region_units import row_sizes, unit_index

                self.row_sizes = row_sizes(ds, task.image_column)
                self.index = unit_index(task, ds, self.label_names, self.region_counts, self.row_sizes)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.ds)

    def _locate(self, index: int) -> tuple[int, int | None]:
        """(dataset row, list item or None) of example ``index``."""
        return self.index[index] if self.index is not None else (index, None)

    def _fields(self, row: dict[str, Any], row_number: int, item: int | None) -> dict[str, Any]:
        if self.task.regions and self.row_sizes is not None:
            return self._unit_rows(row, row_number)[item]
        row = map_row(self.task, apply_aliases(row, self.aliases), row_number)
        if self.task.regions:
            from florence_kit.data.region_targets import region_fields

            row = {**row, **region_fields(self.task.regions, row, self.task.image_column, self.label_names,
                                          self.region_counts)}
        return row if item is None else exploded(self.task, row, item, row_number)

    def _unit_rows(self, row: dict[str, Any], row_number: int) -> list[dict[str, Any]]:
        """A row's examples for tasks with one example per object or phrase (each object counted once)."""
        from florence_kit.data.region_units import region_units

        row = map_row(self.task, apply_aliases(row, self.aliases), row_number)
        width, height = self.row_sizes[row_number]  # type: ignore[index]
        units = region_units(self.task.regions, {**row, "width": width, "height": height}, self.task.image_column,
                             self.label_names, self.region_counts)
        return [{**row, **unit} for unit in units]

    def __getitem__(self, index: int) -> Example:
        row_number, item = self._locate(int(index))
        try:
            row = self.ds[row_number]
        except Exception as exc:  # decoding happens here: a corrupt or missing image file
            raise BadImageError(
                f"row {row_number}: image cannot be read ({type(exc).__name__}: {exc}); fix or remove that row"
            ) from None
        row = self._fields(row, row_number, item)
        image = self._image(row.get(self.task.image_column), row_number)
        prompt, target, refs = render_texts(self.task, row, row_number)
        if self.with_target and target is None:
            raise UserError(f"row {row_number}: no answer in column '{self.task.references}' to train on")
        example_id = _row_id(self.task, row, row_number) + (f"-{item}" if item is not None else "")
        return Example(example_id, image, prompt, target, refs)

    def _image(self, value: Any, row_number: int) -> Image.Image:
        """One RGB image; a list of images gives the first, or all of them tiled (``multi_image: tile``)."""
        images = value if isinstance(value, list) else [value]
        images = images if self.task.multi_image == "tile" else images[:1]
        if not images or not all(isinstance(im, Image.Image) for im in images):
            found = type(images[0]).__name__ if images else "an empty list"
            raise BadImageError(f"row {row_number}: column '{self.task.image_column}' holds no image ({found})")
        try:
            return tile_images([to_rgb(im) for im in images])
        except Exception as exc:
            raise BadImageError(f"row {row_number}: image cannot be decoded ({exc}); fix or remove that row") from None

    def texts(self) -> Iterator[tuple[int, str, str | None]]:
        """(index, prompt, target) for every example without decoding images: the length preflight's input.

        A task with a ``row_map`` reads full rows instead (the function may need the image). A region task's
        ``region_counts`` start again here: after the pass they count every box once.
        """
        for index, (_, prompt, target, _) in enumerate(self._rendered()):
            yield index, prompt, target

    def descriptions(self) -> Iterator[tuple[str, str, list[str]]]:
        """(id, prompt, references) of every example, as ``self[i]`` gives them, in one :meth:`texts`-like pass
        without decoding images: what eval records beside each answer."""
        for example_id, prompt, _, refs in self._rendered():
            yield example_id, prompt, refs

    def _rendered(self) -> Iterator[tuple[str, str, str | None, list[str]]]:
        if self.task.regions:
            self.region_counts.restart()
        sized = {"width", "height"} <= set(self.ds.column_names) or (self.task.regions and self.row_sizes is not None)
        keep_images = self.task.row_map or (self.task.regions and not sized)  # region targets need the image size
        rows = self.ds if keep_images else self.ds.remove_columns([self.task.image_column])
        for row_number, raw in enumerate(rows):
            if self.task.regions and self.row_sizes is not None:  # per object / phrase: the row's units at once
                fields = self._unit_rows(raw, row_number)
                items: Any = range(len(fields))
            else:
                items = [None] if self.index is None else range(len(raw.get(self.task.explode) or []))
                fields = [self._fields(raw, row_number, item) for item in items]
            for item, row_fields in zip(items, fields, strict=True):
                prompt, target, refs = render_texts(self.task, row_fields, row_number)
                suffix = f"-{item}" if item is not None else ""
                yield _row_id(self.task, row_fields, row_number) + suffix, prompt, target, refs


def image_file(dataset: Any, index: int) -> str | None:
    """The file a row's image came from (for the error message), without decoding it."""
    try:
        import datasets

        ds, column = dataset.ds, dataset.task.image_column
        row = dataset._locate(int(index))[0] if hasattr(dataset, "_locate") else int(index)  # exploded rows
        raw = ds.cast_column(column, datasets.Image(decode=False))[row][column]
        return (raw or {}).get("path") if isinstance(raw, dict) else None
    except Exception:
        return None
