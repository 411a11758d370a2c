"""The fast data path (``--prepare-data``): decode and resize every distinct image once, tokenise once.

The per-batch path (florence_kit/data/collate.py) calls the processor on every batch of every epoch: each
page is decoded from PNG/JPEG, converted to RGB and resized again each time it is seen, and DocVQA asks
about four questions per page. Here, before training:

1. every example's prompt and target are tokenised once, exactly as the processor lays them out
   (``<image>`` × image tokens, ``<s>``, the expanded prompt, ``</s>``; checked against the processor on
   the first examples, so a tokenizer that lays text out differently is caught, not silently mistrained);
2. examples that show the same image (the same encoded bytes in the image column) share one entry, and
   every distinct image is decoded, converted and resized once — in a pool of worker processes — to the
   processor's own pixels with rescaling/normalisation held back (:class:`PageResizer`: one PIL resize where
   that is checked to be bit-identical, the processor otherwise), into a uint8 array memory-mapped from disk
   (3 × H × W bytes per page: 1.7 MB at 768 px);
3. a batch is then a gather from that array plus the processor's own ``rescale`` and ``normalize``, so
   ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` equal the per-batch path's exactly
   (tested).

It also knows which examples share a page, which :class:`PageGroups` uses to put a page's questions into
one batch (``--group-by-image``): with ``--cache-vision-features`` its image then goes through the vision
tower once, even in the first epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from florence_kit.common.errors import UserError
from florence_kit.data.collate import IGNORE_INDEX


@dataclass(frozen=True)
class PreparedExample:
    image: int  # row of the pixel store
    input_ids: list[int]
    labels: list[int]


def image_keys(dataset: Any) -> list[str]:
    """One key per example of a TaskDataset (or a mix of them): examples with equal keys show the same image.

    The key hashes the image column's encoded bytes (or file path, size and mtime) without decoding anything. Where the
    column is not a plain ``datasets.Image`` (lists of images, exploded turns), the dataset row is the key:
    the turns of one row share their image.
    """
    memo = getattr(dataset, "image_keys_memo", None)  # set by a run that counted its pages (train/recipe.py)
    return memo if memo is not None else _image_keys(dataset)


def _image_keys(dataset: Any) -> list[str]:

    if hasattr(dataset, "parts"):  # florence_kit.data.mixing.MixedDataset: keys per task, examples by (part, item)
        per_part = [image_keys(part) for part in dataset.parts]
        return [f"{part}-{per_part[part][item]}" for part, item in dataset.index]
    if not hasattr(dataset, "_locate"):
        return [f"example-{i}" for i in range(len(dataset))]
    rows = [dataset._locate(i)[0] for i in range(len(dataset))]
    digests = column_image_keys(dataset.ds, dataset.task.image_column)
    return [digests[row] for row in rows]


def column_image_keys(ds: Any, column: str) -> list[str]:
    """One key per row of ``ds``: rows with equal keys show the same image (a hash of the encoded bytes, or of the
    file's path, size and mtime); ``row-N`` where the column is not a plain ``datasets.Image``."""
    import datasets

    feature = ds.features.get(column) if getattr(ds, "features", None) else None
    if isinstance(feature, datasets.Image):
        raw = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        digests = []
        for value in raw[column]:
            data = (value or {}).get("bytes") or file_state((value or {}).get("path"))
            digests.append(hashlib.blake2b(data, digest_size=16).hexdigest())
        return digests
    return [f"row-{row}" for row in range(len(ds))]


def file_state(path: str | None) -> bytes:
    """An image stored as a file path: the path with the file's size and modification time, so a file replaced
    under the same name (a page fixed after a bad-image error) gets a new key and is prepared again."""
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode() if stat else str(path).encode()


def token_layout(processor: Any, prompts: Sequence[str]) -> list[list[int]]:
    """``input_ids`` of each prompt as Florence-2's processor lays them out, without touching an image."""
    tokenizer = processor.tokenizer
    construct = getattr(processor, "_construct_prompts", None)
    expanded = construct(list(prompts)) if construct else list(prompts)
    image = processor.image_token * processor.num_image_tokens
    texts = [image + tokenizer.bos_token + text + tokenizer.eos_token for text in expanded]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def check_layout(processor: Any, prompts: Sequence[str], ids: Sequence[list[int]]) -> None:
    """The processor itself on a few prompts (with a blank image) must give the same ids."""
    from PIL import Image

    blank = Image.new("RGB", (8, 8), "white")
    for prompt, mine in zip(prompts, ids, strict=False):
        theirs = processor(text=[prompt], images=[blank], return_tensors="np")["input_ids"][0].tolist()
        if theirs != list(mine):
            raise UserError(
                "--prepare-data: this processor lays out the prompt differently from florence-kit's tokenisation "
                f"(prompt {prompt!r}); run without --prepare-data"
            )


# ----------------------------------------------------------------------------------------------- images

_WORKER: dict[str, Any] = {}


def _init_worker(dataset: Any, image_processor: Any, store: str, shape: tuple[int, ...]) -> None:
    _WORKER.update(dataset=dataset, resize=PageResizer(image_processor),
                   store=np.memmap(store, dtype=np.uint8, mode="r+", shape=shape))


def _resize_into(jobs: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Decode example ``index``'s image, resize it as the processor does, write it to store row ``slot``.

    Returns the (slot, message) of images that could not be read.
    """
    from florence_kit.common.errors import BadImageError
    from florence_kit.data.dataset import image_file

    dataset, resize, store = _WORKER["dataset"], _WORKER["resize"], _WORKER["store"]
    bad = []
    for index, slot in jobs:
        try:
            store[slot] = resize(dataset[index].image)
        except BadImageError as exc:
            where = image_file(dataset, index)  # named as the per-batch path names it
            bad.append((slot, f"{exc}{f' (file {where})' if where else ''}"))
    store.flush()
    return bad


def resized(image_processor: Any, image: Any) -> np.ndarray:
    """The processor's pixels before rescaling and normalisation: uint8, channels first."""
    out = image_processor(images=[image], do_rescale=False, do_normalize=False, return_tensors="np")
    pixels = np.asarray(out["pixel_values"][0])
    return np.rint(pixels).clip(0, 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels


class PageResizer:
    """:func:`resized`, as one PIL resize where that gives the processor's exact pixels: about 3x faster on a scan.

    transformers' PIL image processor converts the page to a numpy array and back around the same PIL resize;
    skipping the round trips saves ~80 ms per 4-megapixel page (a DocVQA-sized store: ~15 CPU-minutes). Only
    plain resizes (no crop, no pad) of RGB and greyscale pages take the short way, and the first page of each
    mode is done both ways and compared: any difference, and that mode goes through the processor from then on.
    """

    FAST_MODES = ("RGB", "L")

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        self.checked: dict[str, bool] = {}  # image mode -> the short way gave the processor's pixels
        self.size: tuple[int, int] | None = None  # (width, height)
        self.resample = getattr(image_processor, "resample", None)
        plain = getattr(image_processor, "do_resize", False) and not getattr(image_processor, "do_center_crop", False) \
            and not getattr(image_processor, "do_pad", False) and self.resample is not None
        if plain:
            with contextlib.suppress(KeyError, TypeError, AttributeError):
                height, width = pixel_shape(image_processor)
                self.size = (width, height)

    def __call__(self, image: Any) -> np.ndarray:
        mode = getattr(image, "mode", None)
        if self.size is None or mode not in self.FAST_MODES or self.checked.get(mode) is False:
            return resized(self.image_processor, image)
        from PIL import Image

        small = image.resize(self.size, resample=Image.Resampling(int(self.resample)))
        fast = np.asarray(small.convert("RGB") if mode != "RGB" else small).transpose(2, 0, 1)
        if mode not in self.checked:
            reference = resized(self.image_processor, image)
            self.checked[mode] = fast.shape == reference.shape and bool(np.array_equal(fast, reference))
            return reference
        return fast


def source_fingerprint(dataset: Any, keys: list[str]) -> str:
    """Empty when every key hashes image content; else the dataset's own fingerprint(s) (row-number keys
    say nothing about the pixels), or a fresh random value when there is none: then nothing is reused."""
    if not any(k.startswith(("row-", "example-")) or "-row-" in k for k in keys):
        return ""
    parts = getattr(dataset, "parts", [dataset])
    prints = [getattr(getattr(part, "ds", None), "_fingerprint", None) for part in parts]
    return "|".join(prints) if all(prints) else os.urandom(8).hex()


def store_name(keys: list[str], image_processor: Any, shape: tuple[int, ...], source: str = "") -> str:
    """Name of a pixel store: the distinct images in slot order + the image pipeline's settings + the shape.

    Runs over the same data with the same processor (a sweep over learning rates, a resumed run) find the
    store of an earlier run under a shared ``--prepare-dir`` and skip the decoding entirely.
    """
    digest = hashlib.blake2b(digest_size=12)
    settings = [keys, image_processor.to_dict(), list(shape), source]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"pixels-{digest.hexdigest()}"


@contextlib.contextmanager
def store_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``) held while a store is looked up and filled.

    Runs sharing a ``--prepare-dir`` (a sweep started in parallel) then fill each store once: the second
    waits and reads the first one's back. Where ``fcntl`` is missing (Windows) there is no lock; the
    rename in :meth:`PreparedDataset._fill` still keeps every store whole.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pixel_shape(image_processor: Any) -> tuple[int, int]:
    size = image_processor.size
    height = getattr(size, "height", None) or size["height"]
    width = getattr(size, "width", None) or size["width"]
    return int(height), int(width)


class PreparedDataset:
    """Map-style dataset of :class:`PreparedExample`; ``pixels`` is the memory-mapped uint8 store.

    ``rows`` is the training rows: a :class:`florence_kit.train.runfolder.ImageGuard` (its ``dataset``, ``indices`` and
    ``skip``) or a plain dataset of examples. An unreadable image is an error naming the row, or, with
    ``skip`` (``--skip-bad-images``), its examples are left out and counted in ``rows.skipped``.
    """

    def __init__(
        self, rows: Any, processor: Any, cache_dir: Path, *, workers: int = 0, max_length: int | None = None,
        truncate: bool = False, print_fn: Any = None,
    ) -> None:
        dataset = getattr(rows, "dataset", rows)
        indices = list(getattr(rows, "indices", range(len(dataset))))
        skip = bool(getattr(rows, "skip", False))
        texts = {index: (prompt, target or "") for index, prompt, target in dataset.texts()}
        prompts = [texts[i][0] for i in indices]
        ids = token_layout(processor, prompts)
        check_layout(processor, prompts[:4], ids[:4])
        # truncated as the per-batch Collator truncates: the tokenizer keeps a long target's closing </s>
        limits = {"truncation": True, "max_length": max_length} if truncate and max_length else {}
        labels = processor.tokenizer([texts[i][1] for i in indices], **limits)["input_ids"]
        if limits:
            ids = [x[:max_length] for x in ids]  # as the processor cuts its (special-token-free) prompt text
        keys = image_keys(dataset)
        slots: dict[str, int] = {}
        first: list[int] = []  # a dataset index showing each distinct image
        image_of = []
        for index in indices:
            key = keys[index]
            if key not in slots:
                slots[key] = len(first)
                first.append(index)
            image_of.append(slots[key])
        height, width = pixel_shape(processor.image_processor)
        shape = (len(first), 3, height, width)
        cache_dir.mkdir(parents=True, exist_ok=True)
        name = store_name(list(slots), processor.image_processor, shape, source_fingerprint(dataset, list(slots)))
        path, done = cache_dir / f"{name}.u8", cache_dir / f"{name}.json"
        with store_lock(cache_dir / f"{name}.lock"):  # a second run filling the same store waits, then reuses it
            if done.is_file():  # the same images through the same image pipeline: an earlier run's store
                bad = [(int(slot), str(message)) for slot, message in json.loads(done.read_text())["bad"]]
                reused = True
            else:
                bad = self._fill(dataset, processor, path, shape, first, workers)
                done.write_text(json.dumps({"bad": bad, "images": len(first)}))  # last: the store is complete
                reused = False
        if bad and not skip:
            slot, message = min(bad)
            raise UserError(f"{message}, or pass --skip-bad-images to skip such rows")
        bad_slots = {slot for slot, _ in bad}
        marks = getattr(rows, "bad", None)
        self.examples = []
        self.indices: list[int] = []  # the dataset index of each example (a weighted mix draws by them)
        for position, (img, i, lab) in enumerate(zip(image_of, ids, labels, strict=True)):
            if img in bad_slots:
                if marks is not None:
                    marks[position] = 1  # counted in ImageGuard.skipped, reported at the end
                continue
            self.examples.append(PreparedExample(img, list(i), list(lab)))
            self.indices.append(indices[position])
        if not self.examples:
            raise UserError(f"none of the {len(indices)} training rows has a readable image; check the dataset")
        self.pixels = np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        self.distinct_images = len(first)
        if print_fn:
            how = "read back from an earlier run's store" if reused else "decoded and resized once"
            print_fn(f"prepared {len(self.examples)} examples: {len(first)} distinct images {how} "
                     f"({path.stat().st_size / 1e6:.0f} MB under {cache_dir}), text tokenised once")

    @staticmethod
    def _fill(dataset: Any, processor: Any, path: Path, shape: tuple[int, ...], first: list[int],
              workers: int) -> list[tuple[int, str]]:
        """Decode and resize each distinct image into the store, in a process pool; returns unreadable slots.

        Filled under a private name and renamed into place when full: a run still reading an older store of
        that name keeps its pages, and an interrupted fill leaves no half-written store behind.
        """
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            bad = PreparedDataset._fill_file(dataset, processor, partial, shape, first, workers)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return bad

    @staticmethod
    def _fill_file(dataset: Any, processor: Any, path: Path, shape: tuple[int, ...], first: list[int],
                   workers: int) -> list[tuple[int, str]]:
        np.memmap(path, dtype=np.uint8, mode="w+", shape=shape).flush()  # allocate (sparse) before workers write
        jobs = [(index, slot) for slot, index in enumerate(first)]
        workers = workers or (os.cpu_count() or 1)
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            chunk = max(1, math.ceil(len(jobs) / (workers * 4)))
            pieces = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(dataset, processor.image_processor, str(path), shape)) as pool:
                return [b for part in pool.map(_resize_into, pieces) for b in part]
        _init_worker(dataset, processor.image_processor, str(path), shape)
        try:
            return _resize_into(jobs)
        finally:
            _WORKER.clear()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PreparedExample:
        return self.examples[int(index)]

    def image_of(self) -> list[int]:
        return [example.image for example in self.examples]

    def lengths(self) -> list[int]:
        return [len(example.input_ids) + len(example.labels) for example in self.examples]


class PixelNormalizer:
    """The processor's rescale + normalize on a uint8 batch, run where the batch lands (the GPU, in training).

    The same arithmetic as transformers' numpy ``rescale`` (float64 multiply, rounded to float32) and
    ``normalize`` (float32 subtract and divide), so the result is bit-identical; :meth:`matches` checks it
    against the processor's own functions before it is used. Sending uint8 moves a quarter of the bytes to
    the GPU and takes the per-pixel arithmetic off the data loader's CPU.
    """

    def __init__(self, image_processor: Any) -> None:
        self.rescale = getattr(image_processor, "do_rescale", True)
        self.scale = float(image_processor.rescale_factor)
        self.normalize = getattr(image_processor, "do_normalize", True)
        self.mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        self.std = np.asarray(image_processor.image_std, dtype=np.float32)

    def __call__(self, pixels: Any) -> Any:
        import torch

        x = (pixels.to(torch.float64) * self.scale if self.rescale else pixels).to(torch.float32)
        if self.normalize:
            shape = (1, -1, 1, 1)
            mean = torch.from_numpy(self.mean).to(x.device).view(shape)
            x = (x - mean) / torch.from_numpy(self.std).to(x.device).view(shape)
        return x

    def matches(self, collator: PreparedCollator, rows: np.ndarray) -> bool:
        import torch

        rows = np.array(rows)  # a writable copy: the store is mapped read-only
        return bool(torch.equal(self(torch.from_numpy(rows)), torch.from_numpy(collator.normalized(rows))))


class PreparedCollator:
    """Prepared examples → the same batch dict as :class:`florence_kit.data.collate.Collator` (right padding).

    ``uint8_pixels``: leave ``pixel_values`` as uint8 for a :class:`PixelNormalizer` on the device.
    """

    def __init__(self, processor: Any, pixels: np.ndarray, uint8_pixels: bool = False) -> None:
        self.image_processor = processor.image_processor
        self.pad_id = processor.tokenizer.pad_token_id
        self.pixels = pixels
        self.uint8_pixels = uint8_pixels

    def normalized(self, rows: np.ndarray) -> np.ndarray:
        ip = self.image_processor
        out = []
        for image in rows:
            x = image.astype(np.float32)
            if getattr(ip, "do_rescale", True):
                x = ip.rescale(x, ip.rescale_factor)
            if getattr(ip, "do_normalize", True):
                x = ip.normalize(x, ip.image_mean, ip.image_std)
            out.append(x)
        return np.stack(out).astype(np.float32, copy=False)

    def __call__(self, examples: Sequence[PreparedExample]) -> dict[str, Any]:
        import torch

        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        target = max(len(e.labels) for e in examples)
        labels = torch.full((len(examples), target), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        rows = self.pixels[np.array([e.image for e in examples])]
        pixel_values = torch.from_numpy(np.ascontiguousarray(rows) if self.uint8_pixels else self.normalized(rows))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "labels": labels}


def prepare_training_data(
    rows: Any, processor: Any, where: Path, *, workers: int, max_length: int, truncate: bool, print_fn: Any = None,
) -> tuple[PreparedDataset, PreparedCollator, PixelNormalizer | None]:
    """``--prepare-data`` for the train loop: the prepared rows, their collator, and the device-side normaliser.

    Batches travel as uint8 when :class:`PixelNormalizer` reproduces the processor's arithmetic exactly (checked
    on the first image); otherwise the collator normalises on the CPU and the normaliser is None.
    """
    dataset = PreparedDataset(rows, processor, where, workers=workers, max_length=max_length, truncate=truncate,
                              print_fn=print_fn)
    normalizer = PixelNormalizer(processor.image_processor)
    if normalizer.matches(PreparedCollator(processor, dataset.pixels), dataset.pixels[:1]):
        return dataset, PreparedCollator(processor, dataset.pixels, uint8_pixels=True), normalizer
    return dataset, PreparedCollator(processor, dataset.pixels), None


# ---------------------------------------------------------------------------------------------- samplers


class PageGroups:
    """``--group-by-image``: each epoch shuffles the distinct images, then yields each one's examples together.

    The order is a function of (seed, epoch) alone, like :class:`florence_kit.train.recipe.EpochShuffle`, so a resumed
    run rebuilds it. Batches then hold whole pages (a page's four questions in one batch of eight), and the
    vision-feature cache runs the tower once per page even in the first epoch.
    """

    def __init__(self, image_of: Sequence[int], seed: int, draws: Callable[[int], list[int]] | None = None) -> None:
        self.seed, self.epoch, self.draws, self.image_of = seed, 0, draws, list(image_of)
        self.groups = self.grouped(range(len(image_of)))
        self.size = len(image_of)

    def grouped(self, positions: Iterable[int]) -> list[list[int]]:
        """The positions by image, images in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for index in positions:
            groups.setdefault(self.image_of[index], []).append(index)
        return list(groups.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        groups = self.groups if self.draws is None else self.grouped(self.draws(self.epoch))  # a weighted mix's epoch
        order = torch.randperm(len(groups), generator=generator).tolist()
        return iter([index for g in order for index in groups[g]])


class LengthGroups:
    """``--group-by-length``: batches of similar length (less padding), in a random order each epoch.

    Each epoch is a permutation cut into windows of ``window`` batches; a window is sorted by length and cut
    into batches, and the batches of the epoch are shuffled. Every example is seen once per epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, window: int = 50,
                 draws: Callable[[int], list[int]] | None = None) -> None:
        self.lengths, self.batch_size, self.seed, self.window, self.epoch = list(lengths), batch_size, seed, window, 0
        self.draws = draws  # a weighted mix: the epoch's positions (florence_kit.data.mixing.MixDraws)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if self.draws is not None:
            epoch_draws = self.draws(self.epoch)
            order = [epoch_draws[i] for i in order]
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # the last, possibly short, batch stays last so that every other batch is full
        full, tail = (batches[:-1], batches[-1:]) if len(order) % self.batch_size else (batches, [])
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + tail
        return iter([index for batch in shuffled for index in batch])
