"""Row shapes that are not "one question per row": aliases, row functions, exploded lists, several images.

- **aliases** (``columns: {captions: [captions, caption, sentences]}``): a template field is read from
  the first candidate column the dataset has, so one caption task fits COCO-style ``captions`` lists
  and single ``caption`` strings alike; ``caption_*`` gathers ``caption_0``, ``caption_1``, ... into a list.
- **row_map** (``module:function``): a user function ``row -> row`` from a ``module.py`` beside the task
  file that writes it (an included base file's own folder for a base's row_map). Only code the user named
  in their own task file runs, and only when data is loaded. The module may import files beside it
  (``from helper import x``, at its top level): the folder is importable only while the module loads.
- **explode** (The Cauldron's ``texts``): each item of a list column becomes one example on the row's
  image; the item's keys (``user``, ``assistant``, ``source``) join the row's fields for the templates.
  Earlier turns are *not* given as context: Florence-2 has no chat format, and every Cauldron turn is
  a self-contained question about the image.
- **several images** (``multi_image``): Florence-2 encodes exactly one image. ``first`` keeps the first;
  ``tile`` pastes all of them into one grid image (white background, left to right, top to bottom), so
  questions that compare images (NLVR2's "left/right image", spot_the_diff's differences) stay answerable.
  The price: each image gets a fraction of the 768x768 input.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from florence_kit.common.errors import UserError
from florence_kit.tasks.spec import TaskSpec


def _matches(candidate: str, column_names: list[str]) -> str | list[str] | None:
    if candidate.endswith("*"):  # "caption_*": every such column, gathered into one list (Flickr8k)
        found = sorted(c for c in column_names if c.startswith(candidate[:-1]))
        return found or None
    return candidate if candidate in column_names else None


def resolve_aliases(task: TaskSpec, column_names: list[str]) -> dict[str, str | list[str]]:
    """Template field -> the dataset column (or, for ``prefix*``, columns) that provide it: first match wins."""
    chosen: dict[str, str | list[str]] = {}
    for field_name, candidates in task.aliases.items():
        for candidate in candidates:
            match = _matches(candidate, column_names)
            if match:
                chosen[field_name] = match
                break
    return chosen


def apply_aliases(row: dict[str, Any], aliases: dict[str, str | list[str]]) -> dict[str, Any]:
    out = dict(row)
    for field_name, source in aliases.items():
        if isinstance(source, list):
            out[field_name] = [row[c] for c in source if row.get(c) is not None]
        elif source in row:
            out[field_name] = row[source]
    return out


@contextmanager
def _neighbours_importable(folder: Path) -> Iterator[None]:
    """``from helper import x`` in a row-map module finds the ``helper.py`` beside it while the module loads.

    The folder is on sys.path only for that time, and the neighbours imported leave ``sys.modules`` afterwards
    (the module keeps its references): another task folder's ``helper.py``, or an installed module of that name
    imported later, meets no stale entry. Modules already imported (the standard library's ``json``) win.
    """
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        root = folder.resolve()
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and Path(file).resolve().is_relative_to(root):
                del sys.modules[name]


_ROW_MAPS: dict[tuple[str, str], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def load_row_map(task: TaskSpec) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """Import ``module:function`` from the folder of the task file that wrote it (once); errors name the file
    and the fix."""
    if not task.row_map:
        return None
    module_name, _, function = task.row_map.partition(":")
    path = Path(task.row_map_dir or Path(task.origin).parent) / f"{module_name}.py"
    key = (str(path), function)
    if key not in _ROW_MAPS:
        if not path.is_file():
            raise UserError(f"{task.origin}: row_map '{task.row_map}' needs {path}, which does not exist")
        unique = f"florence_kit_task_{abs(hash(str(path))):x}_{module_name}"
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[unique] = module
        try:
            with _neighbours_importable(path.parent):
                spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise UserError(f"{path}: failed to import ({type(exc).__name__}: {exc})") from None
        fn = getattr(module, function, None)
        if not callable(fn):
            raise UserError(f"{task.origin}: row_map '{task.row_map}': {path} has no function '{function}'")
        _ROW_MAPS[key] = fn
    return _ROW_MAPS[key]


def map_row(task: TaskSpec, row: dict[str, Any], index: int) -> dict[str, Any]:
    """The row as the templates see it: aliases are applied by the caller, then the user's row_map."""
    fn = load_row_map(task)
    if fn is None:
        return row
    try:
        out = fn(dict(row))
    except Exception as exc:
        raise UserError(f"row {index}: row_map '{task.row_map}' failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(out, dict):
        raise UserError(f"row {index}: row_map '{task.row_map}' must return a dict, got {type(out).__name__}")
    return out


def explode_index(task: TaskSpec, ds: Any) -> list[tuple[int, int]]:
    """(row, item) for every item of the ``explode`` column, read without decoding any image."""
    column = task.explode
    index = []
    for row_number, items in enumerate(ds.select_columns([column])[column]):
        index += [(row_number, k) for k in range(len(items or []))]
    return index


def exploded(task: TaskSpec, row: dict[str, Any], item: int, index: int) -> dict[str, Any]:
    """The row's fields with the chosen list item's keys on top (``{user}``, ``{assistant}``, ...)."""
    value = row[task.explode][item]
    if not isinstance(value, dict):
        raise UserError(f"row {index}: items of '{task.explode}' must be mappings, got {type(value).__name__}")
    return {**row, **value}


def tile_images(images: list[Image.Image]) -> Image.Image:
    """All images in one near-square grid of equal cells (the largest width x largest height), on white."""
    if len(images) == 1:
        return images[0]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        canvas.paste(im, (c * cell_w + (cell_w - im.width) // 2, r * cell_h + (cell_h - im.height) // 2))
    return canvas
