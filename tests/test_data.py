"""The DocVQA schema loads from every local format; odd image modes become RGB; bad data is a clear error."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from florence_kit.common.errors import UserError
from florence_kit.data.dataset import TaskDataset, load_split, to_rgb
from florence_kit.demo.synthetic_docvqa import DOCVQA_FEATURES

DOCVQA_COLUMNS = [
    "questionId", "question", "question_types", "image", "docId", "ucsf_document_id", "ucsf_document_page_no",
    "answers",
]


def test_rendered_docvqa_has_the_exact_public_schema(docvqa_splits) -> None:
    for split in ("train", "validation", "test"):
        assert list(docvqa_splits[split].features) == DOCVQA_COLUMNS
        assert docvqa_splits[split].features == DOCVQA_FEATURES
    assert all(not a for a in docvqa_splits["test"]["answers"])  # the test split has no answers


def test_save_to_disk_folder_maps_rows_to_examples(docvqa_dir: Path, docvqa_task) -> None:
    split = load_split(docvqa_task, str(docvqa_dir), "train")
    ex = TaskDataset(split, docvqa_task, with_target=True)[0]
    row = split[0]
    assert ex.prompt == f"<DocVQA>{row['question']}"
    assert ex.target == row["answers"][0] and ex.references == row["answers"]
    assert ex.id == str(row["questionId"]) and ex.image.mode == "RGB"


def test_test_split_without_answers_loads_for_eval(docvqa_dir: Path, docvqa_task) -> None:
    split = load_split(docvqa_task, str(docvqa_dir), "test")
    ex = TaskDataset(split, docvqa_task, with_target=False)[0]
    assert ex.references == [] and ex.target is None
    with pytest.raises(UserError, match="no answer"):
        TaskDataset(split, docvqa_task, with_target=True)[0]


def test_parquet_and_jsonl_folders_give_the_same_examples(tmp_path: Path, docvqa_splits, docvqa_task) -> None:
    pq = tmp_path / "pq"
    pq.mkdir()
    docvqa_splits["train"].to_parquet(str(pq / "train-00000.parquet"))
    docvqa_splits["validation"].to_parquet(str(pq / "validation-00000.parquet"))
    # JSONL with image *paths* relative to the folder, as users write them by hand
    js = tmp_path / "js"
    (js / "images").mkdir(parents=True)
    with (js / "train.jsonl").open("w") as fh:
        for i, row in enumerate(docvqa_splits["train"]):
            row["image"].save(js / "images" / f"{i}.png")
            fh.write(json.dumps({**{k: row[k] for k in DOCVQA_COLUMNS if k != "image"}, "image": f"images/{i}.png"}))
            fh.write("\n")
    a = TaskDataset(load_split(docvqa_task, str(pq), "train"), docvqa_task, with_target=True)
    b = TaskDataset(load_split(docvqa_task, str(js), "train"), docvqa_task, with_target=True)
    assert len(a) == len(b) == len(docvqa_splits["train"])
    for i in (0, len(a) - 1):
        assert (a[i].prompt, a[i].target, a[i].id) == (b[i].prompt, b[i].target, b[i].id)
        assert np.array_equal(np.asarray(a[i].image), np.asarray(b[i].image))
    assert len(load_split(docvqa_task, str(pq), "validation")) == len(docvqa_splits["validation"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "I", "F", "LA", "1"])
def test_any_image_mode_becomes_rgb(mode: str) -> None:
    base = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8), "L")
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base, dtype=np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = base.convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode in {"L", "I;16", "I", "F", "RGBA", "LA", "CMYK"}:  # grey levels survive the conversion
        assert abs(int(np.asarray(out)[0, 5, 0]) - 5) <= 2 and abs(int(np.asarray(out)[3, 3, 1]) - 99) <= 2


def test_transparent_pixels_become_white_paper() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(img)).min() == 255


def test_missing_column_names_it_and_the_fix(docvqa_splits, docvqa_task) -> None:
    ds = docvqa_splits["train"].remove_columns("question")
    with pytest.raises(UserError) as err:
        TaskDataset(ds, docvqa_task, with_target=True)
    assert "question" in str(err.value) and "columns present" in str(err.value)


def test_corrupt_image_names_the_row(docvqa_splits, docvqa_task) -> None:
    ds = docvqa_splits["train"].cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["image"][1] = {"bytes": b"this is not a png", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=DOCVQA_FEATURES)
    dataset = TaskDataset(broken, docvqa_task, with_target=True)
    assert dataset[0].image.mode == "RGB"
    with pytest.raises(UserError, match="row 1: image cannot be read"):
        dataset[1]


def test_unknown_split_lists_the_available_ones(docvqa_dir: Path, docvqa_task) -> None:
    with pytest.raises(UserError, match="available: train, validation, test"):
        load_split(docvqa_task, str(docvqa_dir), "dev")


def test_missing_local_path_and_unreachable_hub_are_clear(docvqa_task, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_split(docvqa_task, str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match="offline"):
        load_split(docvqa_task, None, "train")  # HuggingFaceM4/DocumentVQA with HF_HUB_OFFLINE=1


def test_a_loading_script_dataset_reads_the_hubs_parquet_conversion(docvqa_splits, monkeypatch) -> None:
    """datasets >= 4 refuses script datasets (HuggingFaceM4/VQAv2): the hub's parquet branch is read instead."""
    from florence_kit.tasks.registry import get_task

    calls = []

    def fake_load(source, name=None, streaming=False, revision=None):
        calls.append(revision)
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found VQAv2.py")
        return docvqa_splits

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(load_split(get_task("vqa"), None, "validation")) == len(docvqa_splits["validation"])
    assert calls == [None, "refs/convert/parquet"]

    def no_conversion(source, name=None, streaming=False, revision=None):
        raise RuntimeError("Dataset scripts are no longer supported, but found VQAv2.py") if revision is None \
            else FileNotFoundError("Revision 'refs/convert/parquet' doesn't exist")

    monkeypatch.setattr(datasets, "load_dataset", no_conversion)
    with pytest.raises(UserError, match=r"is a loading script.*save_to_disk\(DIR\)\) and pass --dataset DIR"):
        load_split(get_task("vqa"), None, "validation")


def test_png_bytes_roundtrip_keeps_pixels(docvqa_splits) -> None:
    img = docvqa_splits["train"][0]["image"]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert np.array_equal(np.asarray(Image.open(buf).convert("RGB")), np.asarray(to_rgb(img)))
