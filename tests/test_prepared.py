"""--prepare-data: each page decoded and resized once, text tokenised once, batches equal to the processor's."""

from __future__ import annotations

from pathlib import Path

import pytest

from florence_kit.common.errors import UserError
from florence_kit.train.runfolder import RunFolder


@pytest.fixture(scope="module")
def parts(tiny_dir, docvqa_dir):
    from transformers import AutoProcessor

    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.tasks.registry import get_task

    task = get_task("docvqa")
    dataset = TaskDataset(load_split(task, str(docvqa_dir), "train"), task, with_target=True)
    return AutoProcessor.from_pretrained(tiny_dir), dataset


def _prepared(parts, tmp_path: Path, workers: int = 2, skip: bool = False):
    from florence_kit.data.prepared import PreparedDataset
    from florence_kit.train.runfolder import ImageGuard

    processor, dataset = parts
    rows = ImageGuard(dataset, list(range(len(dataset))), skip=skip)
    return rows, PreparedDataset(rows, processor, tmp_path / "prepared", workers=workers)


def count_calls(monkeypatch, owner, name: str) -> dict:
    """Patch ``owner.name`` (a function or a method) to count its calls; it still does its work."""
    calls = {"n": 0}
    original = getattr(owner, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


@pytest.fixture()
def decodes(monkeypatch) -> dict:
    """Counts the images the preparation pass decodes and resizes (in this process: workers=1)."""
    import florence_kit.data.prepared as prepared_module

    return count_calls(monkeypatch, prepared_module.PageResizer, "__call__")


@pytest.mark.parametrize("workers", [1, 2])
def test_batches_equal_the_processors(parts, tmp_path, workers):
    import torch

    from florence_kit.data.collate import Collator
    from florence_kit.data.prepared import PreparedCollator

    processor, dataset = parts
    _, prepared = _prepared(parts, tmp_path, workers)
    fast, slow = PreparedCollator(processor, prepared.pixels), Collator(processor, max_length=1024)
    for batch in ([0, 1, 2, 3, 4, 5, 6, 7], [23, 5, 11], [9]):
        mine, theirs = fast([prepared[i] for i in batch]), slow([dataset[i] for i in batch])
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert mine[key].dtype == theirs[key].dtype, key
            assert torch.equal(mine[key], theirs[key]), key  # bit-identical, pixels included


def test_each_page_is_decoded_once(parts, tmp_path, decodes):
    import datasets

    processor, dataset = parts
    pages = len(set(dataset.ds["docId"]))
    calls = decodes
    _, prepared = _prepared(parts, tmp_path, workers=1)
    assert isinstance(dataset.ds.features["image"], datasets.Image)
    assert len(prepared) == len(dataset) == 2 * pages  # two questions per page
    assert prepared.distinct_images == pages == calls["n"]
    assert prepared.pixels.shape == (pages, 3, 128, 128)
    shared = [prepared[i].image for i in range(len(prepared))]
    assert sorted(shared.count(s) for s in set(shared)) == [2] * pages


def test_page_groups_put_a_pages_questions_in_one_batch():
    from florence_kit.data.prepared import PageGroups

    image_of = [i // 4 for i in range(40)]  # 10 pages, 4 questions each
    sampler = PageGroups(image_of, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(40))
    for start in range(0, 40, 8):  # batches of 8 hold two whole pages
        assert len({image_of[i] for i in first[start : start + 8]}) == 2
    assert list(sampler) == first  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(40))


def test_length_groups_cut_padding():
    import random

    from florence_kit.data.prepared import LengthGroups
    from florence_kit.train.sampling import EpochShuffle

    lengths = [random.Random(i).randint(20, 120) for i in range(400)]

    def padding(order: list[int], batch: int = 8) -> int:
        chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
        return sum(max(lengths[i] for i in c) * len(c) - sum(lengths[i] for i in c) for c in chunks)

    grouped = list(LengthGroups(lengths, 8, seed=0))
    assert sorted(grouped) == list(range(400))
    assert padding(grouped) < 0.25 * padding(list(EpochShuffle(400, 0)))


def test_bad_image_fails_or_is_skipped(tmp_path, tiny_dir):
    import datasets
    from transformers import AutoProcessor

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.data.prepared import PreparedDataset
    from florence_kit.demo.synthetic_docvqa import render_docvqa
    from florence_kit.tasks.registry import get_task
    from florence_kit.train.runfolder import ImageGuard

    ds = render_docvqa(3, 0, n_fields=2)
    good = ds.cast_column("image", datasets.Image(decode=False))
    rows = good.to_list()
    rows[0]["image"] = {"bytes": b"not an image", "path": "scans/page-0.png"}
    bad = datasets.Dataset.from_list(rows, features=good.features).cast_column("image", datasets.Image())
    task = get_task("docvqa")
    dataset = TaskDataset(bad, task, with_target=True)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    with pytest.raises(UserError, match=r"row 0.*\(file scans/page-0\.png\).*--skip-bad-images"):
        PreparedDataset(ImageGuard(dataset, range(len(dataset)), skip=False), processor, tmp_path / "a", workers=2)
    guard = ImageGuard(dataset, list(range(len(dataset))), skip=True)
    prepared = PreparedDataset(guard, processor, tmp_path / "b", workers=2)
    assert len(prepared) == len(dataset) - 1 and guard.skipped == [0]


def _losses(tiny_dir, docvqa_dir, out: Path, **cfg_kw) -> list[float]:
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.tasks.registry import get_task
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.loop import train_loop
    from florence_kit.train.runfolder import ImageGuard

    task = get_task("docvqa")
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    dataset = TaskDataset(load_split(task, str(docvqa_dir), "train"), task, with_target=True)
    out.mkdir(parents=True)
    cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=out, batch_size=8, lr=1e-3, max_steps=5,
                      log_every=100, **cfg_kw)
    losses: list[float] = []
    train_loop(model, processor, ImageGuard(dataset, range(len(dataset)), skip=False), cfg, RunFolder(out),
               on_step=lambda step, total, loss, lr: losses.append(loss))
    return losses


def test_skipped_bad_images_are_left_out_alike_with_or_without_prepare_data(tiny_dir, tmp_path):
    """--skip-bad-images without --prepare-data replaced a bad row by the next readable one, which was then trained
    on twice an epoch, while --prepare-data left the row out: both now leave it out, found before the first step,
    so the two runs are the same run (same batches, same losses) and report the same skipped rows."""
    import datasets
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.demo.synthetic_docvqa import render_docvqa
    from florence_kit.tasks.registry import get_task
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.loop import train_loop
    from florence_kit.train.runfolder import ImageGuard

    good = render_docvqa(4, 0, n_fields=2).cast_column("image", datasets.Image(decode=False))
    rows = good.to_list()
    rows[1]["image"] = {"bytes": b"not an image", "path": "scans/page-1.png"}
    bad = datasets.Dataset.from_list(rows, features=good.features).cast_column("image", datasets.Image())
    dataset = TaskDataset(bad, get_task("docvqa"), with_target=True)
    guard = ImageGuard(dataset, range(len(dataset)), skip=True)
    readable = [dataset[i].id for i in range(len(dataset)) if i != 1]
    guard.leave_out_unreadable()
    assert [guard[i].id for i in range(len(guard))] == readable and guard.skipped == [1]  # each good row once
    runs = {}
    for prepare in (False, True):
        out = tmp_path / f"prepare-{prepare}"
        out.mkdir()
        cfg = TrainConfig(task="docvqa", model=str(tiny_dir), output_dir=out, batch_size=2, lr=1e-3, max_steps=4,
                          log_every=100, prepare_data=prepare)
        guard, losses = ImageGuard(dataset, range(len(dataset)), skip=True), []
        model, processor = Florence2ForConditionalGeneration.from_pretrained(tiny_dir), AutoProcessor.from_pretrained(
            tiny_dir)
        train_loop(model, processor, guard, cfg, RunFolder(out), on_step=lambda *step, seen=losses:
                   seen.append(step[2]))
        runs[prepare] = (losses, guard.skipped)
    assert len(runs[False][0]) == 4 and runs[False] == runs[True] and runs[True][1] == [1]


def test_uint8_batches_normalised_on_the_device_equal_the_processors(parts, tmp_path):
    import numpy as np
    import torch

    from florence_kit.data.prepared import PixelNormalizer, PreparedCollator

    processor, _ = parts
    _, prepared = _prepared(parts, tmp_path, workers=1)
    normalizer = PixelNormalizer(processor.image_processor)
    assert normalizer.matches(PreparedCollator(processor, prepared.pixels), prepared.pixels[:4])
    batch = [prepared[i] for i in range(6)]
    raw = PreparedCollator(processor, prepared.pixels, uint8_pixels=True)(batch)
    done = PreparedCollator(processor, prepared.pixels)(batch)
    assert raw["pixel_values"].dtype == torch.uint8  # a quarter of the bytes on their way to the GPU
    assert torch.equal(normalizer(raw["pixel_values"]), done["pixel_values"])
    assert np.array_equal(raw["input_ids"], done["input_ids"])


def test_prepared_training_gives_identical_losses(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    from florence_kit.data.prepared import PixelNormalizer

    plain = _losses(tiny_dir, docvqa_dir, tmp_path / "plain")
    calls = count_calls(monkeypatch, PixelNormalizer, "__call__")
    prepared = _losses(tiny_dir, docvqa_dir, tmp_path / "prepared", prepare_data=True)
    assert calls["n"] >= 5  # the training batches came as uint8 and were normalised in the step
    assert len(plain) == 5 and prepared == plain  # same batches, same order: the same run, bit for bit
    grouped = _losses(tiny_dir, docvqa_dir, tmp_path / "grouped", prepare_data=True, group_by_image=True,
                      mode="frozen-encoder", cache_vision_features=True)
    assert len(grouped) == 5 and all(x == x for x in grouped)


def test_group_by_length_needs_prepared_data(tiny_dir, docvqa_dir, tmp_path):
    with pytest.raises(UserError, match="--prepare-data"):
        _losses(tiny_dir, docvqa_dir, tmp_path / "x", group_by_length=True)


def test_a_shared_prepare_dir_is_reused_by_the_next_run(parts, tmp_path, decodes):
    import numpy as np

    _, first = _prepared(parts, tmp_path, workers=1)
    calls = decodes
    calls["n"] = 0
    _, second = _prepared(parts, tmp_path, workers=1)  # same data, same processor, same folder
    assert calls["n"] == 0 and np.array_equal(np.asarray(second.pixels), np.asarray(first.pixels))
    assert len(list((tmp_path / "prepared").glob("pixels-*.u8"))) == 1
    # an unfinished store (no completion record) is filled again, never trusted
    for record in (tmp_path / "prepared").glob("pixels-*.json"):
        record.unlink()
    _, third = _prepared(parts, tmp_path, workers=1)
    assert calls["n"] == third.distinct_images > 0


def test_cli_prepare_data_and_grouping(tiny_dir, docvqa_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from florence_kit.cli import app

    runner = CliRunner()
    base = ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--max-steps", "2",
            "--batch-size", "4", "--quiet"]
    out = tmp_path / "run"
    result = runner.invoke(app, [*base, "--output-dir", str(out), "--prepare-data", "--group-by-length"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["prepare_data"] is True and config["group_by_length"] is True
    assert len(list((out / "prepared").glob("pixels-*.u8"))) == 1
    refused = runner.invoke(app, [*base, "--output-dir", str(tmp_path / "no"), "--group-by-length",
                                  "--no-prepare-data"])  # without --no-prepare-data, --speed auto takes the store
    assert refused.exit_code == 2 and "--prepare-data" in refused.output
    assert not (tmp_path / "no").exists()  # refused before anything was written


def test_an_interrupted_refill_leaves_a_readers_store_whole(parts, tmp_path, monkeypatch):
    """A run reading a store keeps its pages while another run refills that store and is interrupted."""
    import numpy as np

    import florence_kit.data.prepared as prepared

    _, reader = _prepared(parts, tmp_path, workers=1)
    pages = np.array(reader.pixels)
    assert pages.any()
    for record in (tmp_path / "prepared").glob("pixels-*.json"):
        record.unlink()  # the next run must fill the store again

    def interrupted(jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepared, "_resize_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepared(parts, tmp_path, workers=1)
    assert np.array_equal(np.asarray(reader.pixels), pages)  # the reader's mapping still holds its pages
    assert not list((tmp_path / "prepared").glob("*.partial-*"))  # nothing half-written left behind
    assert not list((tmp_path / "prepared").glob("pixels-*.json"))  # and nothing marked complete


def test_a_run_waits_for_a_store_being_filled_then_reuses_it(parts, tmp_path, decodes):
    import threading
    import time

    from florence_kit.data.prepared import store_lock

    _prepared(parts, tmp_path, workers=1)
    (record,) = (tmp_path / "prepared").glob("pixels-*.json")
    (lock,) = (tmp_path / "prepared").glob("pixels-*.lock")
    saved = record.read_text()
    record.unlink()
    decodes["n"] = 0
    done: list = []
    with store_lock(lock):  # another run is filling this store
        waiter = threading.Thread(target=lambda: done.append(_prepared(parts, tmp_path, workers=1)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not done  # it waits instead of filling the same store a second time
        record.write_text(saved)  # the other run completes its store
    waiter.join(timeout=60)
    assert done and decodes["n"] == 0  # read back, not decoded again


def test_truncated_targets_keep_their_end_token_as_the_per_batch_path(parts, docvqa_splits, tmp_path):
    """--too-long truncate: a target longer than the model's positions ends in </s> on both paths."""
    import torch

    from florence_kit.data.collate import Collator
    from florence_kit.data.dataset import TaskDataset
    from florence_kit.data.prepared import PreparedCollator, PreparedDataset

    processor, dataset = parts
    long = docvqa_splits["train"].select(range(3)).map(lambda r: {"answers": ["word " * 1100]})
    examples = TaskDataset(long, dataset.task, with_target=True)
    prepared = PreparedDataset(examples, processor, tmp_path / "prepared", workers=1, max_length=1024, truncate=True)
    batch = [0, 1, 2]
    mine = PreparedCollator(processor, prepared.pixels)([prepared[i] for i in batch])
    theirs = Collator(processor, max_length=1024, truncate=True)([examples[i] for i in batch])
    assert theirs["labels"].shape == (3, 1024)
    assert theirs["labels"][:, -1].tolist() == [processor.tokenizer.eos_token_id] * 3
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key


def test_group_by_image_without_prepared_data_groups_the_training_rows(parts):
    """The loop trains on an ImageGuard over the kept rows: its pages must still be grouped, every row once."""
    from florence_kit.data.prepared import image_keys
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.runfolder import ImageGuard
    from florence_kit.train.sampling import make_sampler

    _, dataset = parts
    kept = [i for i in range(len(dataset)) if i != 3]  # a row dropped by the length preflight
    rows = ImageGuard(dataset, kept, skip=False)
    order = list(make_sampler(rows, TrainConfig("docvqa", "m", Path("out"), group_by_image=True)))
    assert sorted(order) == list(range(len(kept)))
    keys = image_keys(dataset)
    pages = [keys[kept[p]] for p in order]
    runs = [k for n, k in enumerate(pages) if n == 0 or pages[n - 1] != k]
    assert len(runs) == len(set(pages))  # each page's questions come together


def test_an_image_file_changed_in_place_is_prepared_again(tmp_path, tiny_dir):
    """Images read from files (JSONL/parquet with paths): the store is keyed by the files' state too, so a page
    fixed or replaced under the same name (as the bad-image message asks) is not served from the old store."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.data.prepared import PreparedDataset, resized
    from florence_kit.tasks.registry import get_task

    pages = tmp_path / "pages"
    pages.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 64), (40 * k, 0, 0)).save(pages / f"{k}.png")
    rows = [{"image": str(pages / f"{k}.png"), "question": "q?", "answers": ["a"]} for k in range(2)]
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    dataset = TaskDataset(ds, get_task("docvqa"), with_target=True)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    before = PreparedDataset(dataset, processor, tmp_path / "shared", workers=1)
    replacement = Image.new("RGB", (64, 64), (0, 200, 0))
    replacement.save(pages / "1.png")  # same name, other pixels
    after = PreparedDataset(dataset, processor, tmp_path / "shared", workers=1)
    assert np.array_equal(after.pixels[after[1].image], resized(processor.image_processor, replacement))
    assert not np.array_equal(before.pixels[before[1].image], after.pixels[after[1].image])


@pytest.mark.parametrize("size", [128, 96])
def test_the_short_resize_gives_the_processors_pixels(tiny_dir, monkeypatch, size):
    """PageResizer's one PIL call equals the processor's pipeline bit for bit on RGB, greyscale, RGBA and palette
    pages, down and up; after the first page of a mode the processor is not called for that mode."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    import florence_kit.data.prepared as prepared_module

    image_processor = AutoProcessor.from_pretrained(tiny_dir).image_processor
    image_processor.size = {"height": size, "width": size + 32}
    calls = count_calls(monkeypatch, prepared_module, "resized")
    resize = prepared_module.PageResizer(image_processor)
    rng = np.random.default_rng(0)
    pages = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((900, 700), (60, 50))]
    pages += [pages[0].convert(mode) for mode in ("L", "RGBA", "P")] + [pages[1].convert("L")]
    mine = [resize(page) for page in pages]
    processor_calls = calls["n"]
    for page, pixels in zip(pages, mine, strict=True):
        assert np.array_equal(pixels, prepared_module.resized(image_processor, page)), page.mode
        assert pixels.shape == (3, size, size + 32) and pixels.dtype == np.uint8
    # the processor ran for the first RGB and first L page (the check) and for the RGBA and P pages only
    assert processor_calls == 4 and resize.checked == {"RGB": True, "L": True}


def test_the_short_resize_steps_aside_when_it_differs(tiny_dir, monkeypatch):
    """A processor whose pixels the PIL call does not reproduce: the check sees it and the processor does every
    page of that mode, so the store still holds the processor's pixels."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    import florence_kit.data.prepared as prepared_module

    image_processor = AutoProcessor.from_pretrained(tiny_dir).image_processor
    original = prepared_module.resized
    monkeypatch.setattr(prepared_module, "resized", lambda ip, image: 255 - original(ip, image))
    resize = prepared_module.PageResizer(image_processor)
    page = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    for _ in range(3):
        assert np.array_equal(resize(page), 255 - original(image_processor, page))
    assert resize.checked == {"RGB": False}
    image_processor.do_center_crop = True
    assert prepared_module.PageResizer(image_processor).size is None  # a crop: always the processor
