"""Training data for one task or a weighted mix of tasks (``--task a,b`` or a group such as ``cauldron``).

A mix is one map-style dataset whose positions are drawn, with a fixed seed, from the tasks in
proportion to their sampling weights; within a task, examples come in a shuffled order and repeat
only once all have been seen. By default the weights are the tasks' sizes (every example exactly once
per epoch, the "examples-proportional" mix); ``--mix-weights`` sets them (``2,1`` in task order, or
``cauldron/ai2d=2,cauldron/chartqa=1``; tasks left out weigh 1), e.g. to up-sample a small task.
The epoch length stays the total number of examples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from florence_kit.data import Example, TaskDataset, cap_rows, load_split
from florence_kit.errors import UserError
from florence_kit.task import TaskSpec


def parse_weights(text: str | None, names: Sequence[str]) -> list[float] | None:
    """``"2,1"`` (task order) or ``"name=2,name=1"`` -> one weight per task; None = proportional to size."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            given = {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise UserError(f"--mix-weights names {unknown}, not in the mix ({', '.join(names)})")
            weights = [given.get(n, 1.0) for n in names]
        else:
            weights = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--mix-weights '{text}': expected numbers like '2,1' or 'task=2,task=1'") from None
    if len(weights) != len(names):
        raise UserError(f"--mix-weights has {len(weights)} weights for {len(names)} tasks ({', '.join(names)})")
    if any(w < 0 for w in weights) or not any(weights):
        raise UserError("--mix-weights must be non-negative and not all zero")
    return weights


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Draws per task: ``total`` split in proportion to ``weights`` (largest remainder).

    Counted, not drawn at random: a mix weighted by size then takes every example exactly once, where
    independent random draws left some examples out of every epoch (the index is the same each epoch).
    """
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


class MixedDataset:
    """Several task datasets sampled by weight into one map-style dataset of examples."""

    def __init__(self, parts: Sequence[TaskDataset], weights: Sequence[float], seed: int = 0) -> None:
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        rng = random.Random(seed)
        sizes = [len(p) for p in self.parts]
        live = [w if n else 0.0 for w, n in zip(self.weights, sizes, strict=True)]
        if not any(live):
            raise UserError("every task in the mix is empty (or weighs 0)")
        orders = [rng.sample(range(n), n) for n in sizes]
        sequence = [k for k, count in enumerate(allocate(sum(sizes), live)) for _ in range(count)]
        rng.shuffle(sequence)  # the tasks interleaved at random; how many of each is fixed by the weights
        seen = [0] * len(self.parts)
        self.index: list[tuple[int, int]] = []
        for part in sequence:
            self.index.append((part, orders[part][seen[part] % sizes[part]]))
            seen[part] += 1
        self.counts = [sum(1 for p, _ in self.index if p == k) for k in range(len(self.parts))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Example:
        part, item = self.index[int(index)]
        return self.parts[part][item]

    def texts(self) -> Iterator[tuple[int, str, str | None]]:
        """(position, prompt, target) for every position, for the length preflight."""
        texts = [{i: (p, t) for i, p, t in part.texts()} for part in self.parts]
        for position, (part, item) in enumerate(self.index):
            prompt, target = texts[part][item]
            yield position, prompt, target


@dataclass
class TrainingData:
    """What ``finetune`` trains on: a name and origin for the run's config, and the examples."""

    name: str
    origin: str
    dataset: Any
    mix: dict[str, dict[str, float]] = field(default_factory=dict)


def task_examples(
    task: TaskSpec, dataset: str | None, split: str, *, streaming: bool = False, max_samples: int | None = None
) -> TaskDataset:
    """One task's examples of one split (``--max-samples`` caps rows; streamed rows stop there)."""
    return TaskDataset(cap_rows(load_split(task, dataset, split, streaming=streaming), max_samples), task,
                       with_target=True)


def training_data(
    tasks: Sequence[TaskSpec],
    dataset: str | None = None,
    *,
    streaming: bool = False,
    max_samples: int | None = None,
    mix_weights: str | None = None,
    seed: int = 0,
) -> TrainingData:
    """The training examples of one task, or of several mixed by weight."""
    if len(tasks) == 1:
        task = tasks[0]
        if mix_weights:
            raise UserError("--mix-weights needs several tasks (--task a,b or a group name)")
        examples = task_examples(task, dataset, task.dataset.train_split, streaming=streaming, max_samples=max_samples)
        return TrainingData(task.name, task.origin, examples)
    names = [t.name for t in tasks]
    weights = parse_weights(mix_weights, names)
    parts = [task_examples(t, dataset, t.dataset.train_split, streaming=streaming, max_samples=max_samples)
             for t in tasks]
    mixed = MixedDataset(parts, weights or [len(p) for p in parts], seed=seed)
    mix = {n: {"weight": w, "examples": len(p), "drawn": c}
           for n, w, p, c in zip(names, mixed.weights, parts, mixed.counts, strict=True)}
    origins = sorted({t.origin for t in tasks})
    return TrainingData(",".join(names), "; ".join(origins), mixed, mix)
