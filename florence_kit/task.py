"""A task is data: a YAML file (safe-loaded) read into a frozen TaskSpec.

Shared fields live in a base file pulled in with ``include:``; the including file's keys win
(nested mappings such as ``dataset`` and ``generation`` are merged key by key).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from florence_kit.errors import UserError

KNOWN_KEYS = {
    "include", "task", "description", "dataset", "columns", "prompt", "target", "references",
    "metric", "generation",
}
DATASET_KEYS = {"path", "name", "train_split", "eval_split", "test_split"}
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

    def required_columns(self, *, with_target: bool) -> list[str]:
        """Columns the templates read; checked up front so a missing one is a clear error."""
        cols = [self.image_column, *template_fields(self.prompt)]
        if with_target:
            cols += [*template_fields(self.target), self.references]
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
    include = data.pop("include", None)
    if include:
        base_path = path.parent / str(include)
        if not base_path.is_file():
            raise UserError(f"{path}: include '{include}' not found next to the file")
        data = _merge(read_task_yaml(base_path, (*_seen, path)), data)
    return data


def spec_from_dict(data: dict[str, Any], origin: str) -> TaskSpec:
    """Validate a task mapping and build a TaskSpec; every problem names the file and the field."""
    unknown = set(data) - KNOWN_KEYS
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
    target = str(data["target"])
    references = data.get("references") or (template_fields(target) or [""])[0]

    from florence_kit.metrics import get_metric  # noqa: PLC0415 - metrics import Levenshtein only

    try:
        get_metric(str(data["metric"]))
    except KeyError as exc:
        raise UserError(f"{origin}: {exc.args[0]}") from None
    return TaskSpec(
        name=str(data["task"]),
        description=str(data.get("description", "")),
        prompt=str(data["prompt"]),
        target=target,
        references=str(references),
        metric=str(data["metric"]),
        dataset=DatasetSource(**dataset),
        image_column=str(columns.get("image", "image")),
        id_column=columns.get("id"),
        generation=dict(generation),
        origin=origin,
    )


def load_task_file(path: Path) -> TaskSpec:
    """Read and validate one task file."""
    return spec_from_dict(read_task_yaml(path), origin=str(path))
