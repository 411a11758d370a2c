"""Training data for one task or a weighted mix of tasks (``--task a,b`` or a group such as ``cauldron``).

A mix is one map-style dataset holding every example of every task once (each task's examples in a
seeded shuffled order, the tasks interleaved), so that the length preflight and ``--prepare-data`` see each
example once. By default the weights are the tasks' sizes: every example exactly once per epoch (the
"examples-proportional" mix). ``--mix-weights`` sets them (``2,1`` in task order, or
``cauldron/ai2d=2,cauldron/chartqa=1``; tasks left out weigh 1), e.g. to up-sample a small task: then
each epoch draws a task's share of positions by :class:`MixDraws`, continuing through the task's
shuffled order where the previous epoch stopped (a down-weighted task sees all its examples over the
epochs, not the same few every epoch). The epoch length stays the total number of examples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.data.dataset import Example, TaskDataset, cap_rows, load_split
from florence_kit.tasks.spec import TaskSpec


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
    """Several task datasets as one map-style dataset: every example once; the weights act per epoch (:meth:`draws`)."""

    def __init__(self, parts: Sequence[TaskDataset], weights: Sequence[float], seed: int = 0) -> None:
        self.parts = list(parts)
        self.weights = [float(w) for w in weights]
        rng = random.Random(seed)
        sizes = [len(p) for p in self.parts]
        self.live = [w if n else 0.0 for w, n in zip(self.weights, sizes, strict=True)]
        if not any(self.live):
            raise UserError("every task in the mix is empty (or weighs 0)")
        orders = [rng.sample(range(n), n) for n in sizes]
        sequence = [k for k, n in enumerate(sizes) for _ in range(n)]
        rng.shuffle(sequence)  # the tasks interleaved at random (the index a mix weighted by size always had)
        seen = [0] * len(self.parts)
        self.index: list[tuple[int, int]] = []
        for part in sequence:
            self.index.append((part, orders[part][seen[part]]))
            seen[part] += 1
        self.counts = allocate(sum(sizes), self.live)  # draws per task and epoch (before the length preflight)
        self.by_size = self.counts == sizes  # every example exactly once an epoch: no per-epoch draws needed

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

    def draws(self, indices: Sequence[int]) -> MixDraws | None:
        """Each epoch's draws over training positions whose examples are ``indices`` (the rows the preflight
        kept); None where the weights are the sizes and a plain shuffle of the positions already is the mix."""
        if self.by_size:
            return None
        return MixDraws([self.index[i][0] for i in indices], self.live)


class MixDraws:
    """A weighted mix's epochs: ``draws(epoch)`` lists the training positions of that epoch (a sampler shuffles them).

    Task t's share s_t of the epoch (largest remainder over the kept examples) takes its k-th draw of epoch e from
    position ``order_t[(e * s_t + k) mod n_t]``, ``order_t`` being its n_t positions in their shuffled order: each
    epoch continues where the last stopped, and an example repeats only once the task's others were all drawn. A
    function of the epoch alone, so ``--resume`` and every DDP process rebuild any epoch.
    """

    def __init__(self, task_of: Sequence[int], weights: Sequence[float]) -> None:
        self.orders: list[list[int]] = [[] for _ in weights]
        for position, task in enumerate(task_of):
            self.orders[task].append(position)
        live = [w if order else 0.0 for w, order in zip(weights, self.orders, strict=True)]
        if not any(live):
            raise UserError("no training examples left of the tasks that weigh more than 0 in the mix")
        self.shares = allocate(len(task_of), live)

    def __len__(self) -> int:
        return sum(self.shares)

    def __call__(self, epoch: int) -> list[int]:
        return [order[(epoch * share + k) % len(order)]
                for order, share in zip(self.orders, self.shares, strict=True) for k in range(share)]


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
