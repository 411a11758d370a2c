"""The epoch order: a function of (seed, epoch) alone, so a resume and every DDP process rebuild it.

Plain shuffling (:class:`EpochShuffle`), or grouped by page / by length (the prepared store's samplers),
over a weighted mix's per-epoch draws where there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.train.config import TrainConfig


class EpochShuffle:
    """A sampler whose order is a function of (seed, epoch) alone.

    A resumed run rebuilds any epoch's order without having iterated the earlier ones, and under DDP
    every process draws the same permutation, which Accelerate then deals out batch by batch: the global
    batch of N processes x B equals a single process's batch of N*B. The order is the one
    ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` gives in its e-th epoch
    (each epoch draws a worker base seed and a permutation from that generator, and torch's
    RandomSampler draws one more permutation as it finishes), which the loop used before it could
    resume: the demo's measured results were made with it.
    """

    def __init__(self, size: int, seed: int, draws: Callable[[int], list[int]] | None = None) -> None:
        self.size, self.seed, self.epoch, self.draws = size, seed, 0, draws

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch + 1):
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base-seed draw
            order = torch.randperm(self.size, generator=generator)
            torch.randperm(self.size, generator=generator)  # RandomSampler's empty remainder permutation
        return iter(drawn(order.tolist(), self.draws, self.epoch))


def drawn(order: list[int], draws: Callable[[int], list[int]] | None, epoch: int) -> list[int]:
    """A sampler's shuffled slots as positions: a weighted mix's slots are the epoch's draws
    (:class:`florence_kit.data.mixing.MixDraws`), any other's the positions themselves."""
    if draws is None:
        return order
    epoch_draws = draws(epoch)
    return [epoch_draws[i] for i in order]


def mix_draws(rows: Any, dataset: Any) -> Callable[[int], list[int]] | None:
    """The per-epoch draws of a weighted mix over ``dataset``'s positions (None: each position once an epoch).

    ``rows`` are the training rows before ``--prepare-data``: an ImageGuard, whose ``dataset`` may be the mix;
    ``dataset`` is what the loader reads, whose ``indices`` are the mix positions it kept.
    """
    mixed = getattr(rows, "dataset", rows)
    if not hasattr(mixed, "draws"):
        return None
    return mixed.draws(list(getattr(dataset, "indices", range(len(dataset)))))


def training_image_keys(dataset: Any) -> list[str]:
    """One image key per training position. The loop trains on an ImageGuard (kept rows of the examples):
    its positions are ``indices`` into the examples, which alone know their images."""
    from florence_kit.data.prepared import image_keys

    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        keys = image_keys(dataset.dataset)
        return [keys[i] for i in dataset.indices]
    return image_keys(dataset)


def make_sampler(dataset: Any, cfg: TrainConfig, draws: Callable[[int], list[int]] | None = None) -> Any:
    """The epoch order: a plain shuffle, or grouped by page (``--group-by-image``) or length (``--group-by-length``);
    of a weighted mix's ``draws`` for the epoch, where given."""
    if cfg.group_by_image and cfg.group_by_length:
        raise UserError("choose one of --group-by-image and --group-by-length")
    if cfg.group_by_length:
        from florence_kit.data.prepared import LengthGroups

        if not hasattr(dataset, "lengths"):
            raise UserError("--group-by-length needs --prepare-data (the lengths come from its tokenisation)")
        return LengthGroups(dataset.lengths(), cfg.batch_size, cfg.seed, draws=draws)
    if cfg.group_by_image:
        from florence_kit.data.prepared import PageGroups

        if hasattr(dataset, "image_of"):
            return PageGroups(dataset.image_of(), cfg.seed, draws=draws)
        keys = training_image_keys(dataset)
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return PageGroups([index[k] for k in keys], cfg.seed, draws=draws)
    return EpochShuffle(len(dataset), cfg.seed, draws)
