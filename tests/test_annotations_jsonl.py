"""Roboflow's Florence-2 export / maestro's layout, DIR/{train,valid,test}/annotations.jsonl, loads as it is,
and the built-in ``florence-jsonl`` task trains and scores it (the metric follows each prefix's task token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.data.dataset import TaskDataset, load_source, load_split
from florence_kit.metrics import get_metric
from florence_kit.tasks.registry import get_task

BOXES = "red square<loc_100><loc_120><loc_400><loc_420>blue circle<loc_500><loc_500><loc_900><loc_880>"


def rows(split: str, n: int) -> list[dict]:
    """Half DocVQA questions, half detection, as a mixed Roboflow export would have."""
    out = []
    for i in range(n):
        if i % 2:
            out.append({"image": f"img{i}.png", "prefix": "<OD>", "suffix": BOXES})
        else:
            out.append({"image": f"img{i}.png", "prefix": f"<DocVQA>what is field {i}?", "suffix": f"{split}-{i}"})
    return out


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True)
        for i, row in enumerate(rows(split, n)):
            Image.new("RGB", (32 + i, 24), (10 * i, 0, 0)).save(folder / row["image"])
        (folder / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(split, n)))
    return root


def test_split_folders_load_with_their_own_images(tmp_path: Path):
    ds = load_source(str(make_folder(tmp_path / "data", {"train": 3, "valid": 2, "test": 1})))
    assert sorted(ds) == ["test", "train", "validation"]  # "valid" is the validation split
    assert ds["train"].column_names == ["image", "prefix", "suffix"]  # not an image folder with a `label`
    row = ds["validation"][1]
    assert row["prefix"] == "<OD>" and row["suffix"] == BOXES
    assert row["image"].size == (33, 24)  # valid/img1.png, not train/img1.png


def test_florence_jsonl_task_reads_prefix_and_suffix(tmp_path: Path):
    data = make_folder(tmp_path / "data", {"train": 4, "valid": 2})
    task = get_task("florence-jsonl")
    examples = TaskDataset(load_split(task, str(data), task.dataset.eval_split), task, with_target=True)
    first, second = examples[0], examples[1]
    assert (first.prompt, first.target) == ("<DocVQA>what is field 0?", "valid-0")
    assert (second.prompt, second.target) == ("<OD>", BOXES)
    assert json.loads(second.references[0]) == {"task": "<OD>", "answer": BOXES}


def test_metric_follows_the_task_token():
    metric = get_metric("florence_task")
    refs = [[json.dumps({"task": "<DocVQA>", "answer": "42"})], [json.dumps({"task": "<OD>", "answer": BOXES})],
            [json.dumps({"task": "<OCR>", "answer": "hello"})]]
    scores, value, details = metric.compute_with_details(["42", BOXES, "hello"], refs)
    assert scores == [1.0, 1.0, 1.0] and value == pytest.approx(1.0)
    assert set(details) == {"anls", "coco_map", "1-cer"}
    # one box moved off its object: mAP drops, the answers of the other tasks are scored as before
    moved = BOXES.replace("<loc_500><loc_500><loc_900><loc_880>", "<loc_0><loc_0><loc_50><loc_50>")
    scores, value, details = metric.compute_with_details(["42", moved, "hallo"], refs)
    assert details["coco_map"]["score"] == pytest.approx(0.5)
    assert details["1-cer"]["score"] == pytest.approx(0.8)
    assert details["anls"]["score"] == 1.0 and value == pytest.approx((1.0 + 0.5 + 0.8) / 3)


@pytest.mark.slow
def test_florence_jsonl_trains_and_evaluates(tmp_path: Path, tiny_dir: Path):
    from florence_kit.cli import app

    data = make_folder(tmp_path / "data", {"train": 8, "valid": 4})
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "florence-jsonl", "--model", str(tiny_dir), "--dataset", str(data),
                                 "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2",
                                 "--quiet", "--mode", "frozen-encoder"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "florence-jsonl", "--model", str(tmp_path / "run"), "--dataset", str(data),
                                 "--output-dir", str(tmp_path / "eval")])
    assert result.exit_code == 0 and "florence_task" in result.output, result.output
