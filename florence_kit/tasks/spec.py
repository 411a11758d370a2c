"""A task is data: a YAML file (safe-loaded) read into a frozen TaskSpec.

Shared fields live in a base file pulled in with ``include:``; the including file's keys win
(nested mappings such as ``dataset`` and ``generation`` are merged key by key).

One file can stand for many tasks: ``subsets:`` (a list of names, or a mapping name -> overrides)
expands into one task per subset, with ``{subset}`` replaced in ``task``, ``description`` and the
``dataset`` fields (The Cauldron's ~50 configurations are one file). Row-level options, for schemas
that are not one question per row: ``explode`` (a list column whose items each become an example),
``multi_image`` (``first`` or ``tile`` for rows with several images), ``row_map`` (``module:function``
from a ``module.py`` beside the file that writes it, which may be an included base in another folder;
imported only when data is loaded, never when listing), and ``columns`` aliases (a template field read
from the first of several candidate columns).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from florence_kit.common.errors import UserError

KNOWN_KEYS = {
    "include", "task", "description", "dataset", "columns", "prompt", "target", "references",
    "metric", "generation", "group", "subsets", "explode", "multi_image", "row_map", "regions",
}
MULTI_IMAGE = ("first", "tile")
DATASET_KEYS = {"path", "name", "train_split", "eval_split", "test_split"}
CODE_DIR = "__row_map_dir__"  # set by read_task_yaml: the folder of the file that wrote ``row_map``
GENERATION_KEYS = {"max_new_tokens", "num_beams", "no_repeat_ngram_size", "repetition_penalty", "length_penalty"}


@dataclass(frozen=True)
class DatasetSource:
    """Where a task's data lives by default, and which split plays which role."""

    path: str
    name: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str | None = "test"


@dataclass(frozen=True)
class TaskSpec:
    """Everything florence-kit needs to train and score one task."""

    name: str
    prompt: str
    target: str
    references: str
    metric: str
    dataset: DatasetSource
    description: str = ""
    image_column: str = "image"
    id_column: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    extra_metrics: tuple[str, ...] = ()
    group: str | None = None
    explode: str | None = None
    multi_image: str = "first"
    row_map: str | None = None
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    regions: dict[str, Any] | None = None  # region tasks (od, grounding, ...): see florence_kit.data.region_targets
    row_map_dir: str | None = None  # where row_map's module lives (None: beside ``origin``)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The task's metric first, then any further metrics it reports."""
        return (self.metric, *self.extra_metrics)

    def required_columns(self, *, with_target: bool) -> list[str]:
        """Columns the templates read; checked up front so a missing one is a clear error.

        With ``explode`` the templates read the list items' keys, checked row by row instead;
        with ``row_map`` the function may create any field, so only the image is required.
        """
        if self.row_map:
            return [self.image_column]
        if self.regions:  # objects "." : one object per row, its keys read from the row (RefCOCO-style)
            return [self.image_column] + ([self.regions["objects"]] if self.regions["objects"] != "." else [])
        if self.explode:
            return [self.image_column, self.explode]
        cols = [self.image_column, *template_fields(self.prompt)]
        if with_target:
            cols += [*template_fields(self.target), self.references.split(".", 1)[0]]
        return list(dict.fromkeys(cols))


def template_fields(template: str) -> list[str]:
    """Top-level row fields a ``str.format`` template uses: ``"{answers[0]}"`` → ``["answers"]``."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name:
            names.append(field_name.split("[", 1)[0].split(".", 1)[0])
    return names


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def read_task_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one task file with its ``include:`` chain resolved (relative to the file)."""
    path = path.resolve()
    if path in _seen:
        raise UserError(f"{path}: include cycle ({' -> '.join(p.name for p in (*_seen, path))})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: not valid YAML ({first}); fix the file or remove it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}")
    _anchor_row_map(data, path.parent)
    include = data.pop("include", None)
    if include:
        base_path = path.parent / str(include)
        if not base_path.is_file():
            raise UserError(f"{path}: include '{include}' not found next to the file")
        data = _merge(read_task_yaml(base_path, (*_seen, path)), data)
    return data


def _anchor_row_map(data: dict[str, Any], folder: Path) -> None:
    """Record beside ``row_map`` (top level, or a subset's override) the folder of the file that writes it: the
    module is that file's neighbour, also when the file is a base included from another folder."""
    subsets = data.get("subsets")
    overrides = subsets.values() if isinstance(subsets, dict) else ()
    for mapping in (data, *overrides):
        if isinstance(mapping, dict) and "row_map" in mapping:
            mapping[CODE_DIR] = str(folder)


def spec_from_dict(data: dict[str, Any], origin: str) -> TaskSpec:
    """Validate a task mapping and build a TaskSpec; every problem names the file and the field."""
    unknown = set(data) - KNOWN_KEYS - {CODE_DIR}
    if unknown:
        raise UserError(f"{origin}: unknown key(s) {sorted(unknown)}; allowed: {sorted(KNOWN_KEYS - {'include'})}")
    for key in ("task", "prompt", "target", "metric", "dataset"):
        if not data.get(key):
            raise UserError(f"{origin}: missing required field '{key}'")
    dataset = data["dataset"]
    if isinstance(dataset, str):
        dataset = {"path": dataset}
    if not isinstance(dataset, dict) or "path" not in dataset:
        raise UserError(f"{origin}: 'dataset' needs at least a 'path' (hub id or local folder)")
    bad = set(dataset) - DATASET_KEYS
    if bad:
        raise UserError(f"{origin}: unknown dataset key(s) {sorted(bad)}; allowed: {sorted(DATASET_KEYS)}")
    generation = data.get("generation") or {}
    bad = set(generation) - GENERATION_KEYS
    if bad:
        raise UserError(f"{origin}: unknown generation key(s) {sorted(bad)}; allowed: {sorted(GENERATION_KEYS)}")
    columns = data.get("columns") or {}
    if not isinstance(columns, dict):
        raise UserError(f"{origin}: 'columns' must map a field to a column name (or a list of candidates)")
    aliases = {
        str(k): tuple(str(c) for c in (v if isinstance(v, list) else [v]))
        for k, v in columns.items() if k not in {"image", "id"}
    }
    target = str(data["target"])
    for key in ("prompt", "target"):
        _check_template(str(data[key]), key, origin)
    references = data.get("references") or (template_fields(target) or [""])[0]
    metrics = data["metric"] if isinstance(data["metric"], list) else [data["metric"]]
    multi_image = str(data.get("multi_image", "first"))
    if multi_image not in MULTI_IMAGE:
        raise UserError(f"{origin}: multi_image must be one of {', '.join(MULTI_IMAGE)}, got '{multi_image}'")
    row_map = data.get("row_map")
    row_map_dir = data.get(CODE_DIR) if row_map else None
    if row_map is not None:
        _check_row_map(str(row_map), origin, Path(row_map_dir) if row_map_dir else Path(origin).parent)

    regions = None
    if data.get("regions") is not None:
        from florence_kit.tasks.region_block import check_regions  # noqa: PLC0415

        regions = check_regions(data["regions"], origin)

    from florence_kit.metrics import get_metric  # noqa: PLC0415 - metrics import Levenshtein only

    for name in metrics:
        try:
            get_metric(str(name))
        except KeyError as exc:
            raise UserError(f"{origin}: {exc.args[0]}") from None
    return TaskSpec(
        name=str(data["task"]),
        description=str(data.get("description", "")),
        prompt=str(data["prompt"]),
        target=target,
        references=str(references),
        metric=str(metrics[0]),
        dataset=DatasetSource(**dataset),
        image_column=str(columns.get("image", "image")),
        id_column=columns.get("id"),
        generation=dict(generation),
        origin=origin,
        extra_metrics=tuple(str(m) for m in metrics[1:]),
        group=str(data["group"]) if data.get("group") else None,
        explode=str(data["explode"]) if data.get("explode") else None,
        multi_image=multi_image,
        row_map=str(row_map) if row_map else None,
        aliases=aliases,
        regions=regions,
        row_map_dir=row_map_dir,
    )


def _check_template(template: str, key: str, origin: str) -> None:
    """A template ``str.format`` can fill from a row: a stray brace used to surface as a traceback at data time."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"{origin}: {key} '{template}' is not a template ({exc}); "
                        "write a literal brace as {{ or }}") from None
    for name in fields:
        head = name.split("[", 1)[0].split(".", 1)[0]
        if not head or head.isdigit() or any(q in head for q in "\"'"):
            raise UserError(f"{origin}: {key} '{template}' has '{{{name}}}', which names no column; "
                            "write a literal brace as {{ or }}")


def _check_row_map(row_map: str, origin: str, folder: Path) -> None:
    """``module:function`` with ``module.py`` in ``folder``, that of the file writing it (checked now, imported
    at data time)."""
    module, _, function = row_map.partition(":")
    if not module or not function or not module.isidentifier() or not function.isidentifier():
        raise UserError(f"{origin}: row_map must be 'module:function' (a module.py beside the file), got '{row_map}'")
    if Path(origin).is_file() and not (folder / f"{module}.py").is_file():
        raise UserError(f"{origin}: row_map '{row_map}' needs {folder / (module + '.py')}, which does not exist")


def expand_subsets(data: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """One task mapping per entry of ``subsets:`` (or the mapping itself when there is none)."""
    subsets = data.pop("subsets", None)
    if subsets is None:
        return [data]
    if isinstance(subsets, list):
        subsets = dict.fromkeys(subsets)
    if not isinstance(subsets, dict) or not subsets:
        raise UserError(f"{origin}: 'subsets' must be a non-empty list of names or a mapping name -> overrides")
    out = []
    for subset, overrides in subsets.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise UserError(f"{origin}: subset '{subset}' overrides must be a mapping, got {overrides!r}")
        item = _merge(data, overrides or {})
        for key in ("task", "description"):
            if isinstance(item.get(key), str):
                item[key] = item[key].replace("{subset}", str(subset))
        if isinstance(item.get("dataset"), dict):
            item["dataset"] = {
                k: v.replace("{subset}", str(subset)) if isinstance(v, str) else v for k, v in item["dataset"].items()
            }
        out.append(item)
    return out


def load_task_specs(path: Path) -> list[TaskSpec]:
    """Read and validate one task file: one task, or one per entry of its ``subsets:``."""
    data = read_task_yaml(path)
    return [spec_from_dict(item, origin=str(path)) for item in expand_subsets(data, str(path))]
