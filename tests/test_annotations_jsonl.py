"""Roboflow's Florence-2 export / maestro's layout, DIR/{train,valid,test}/annotations.jsonl, loads as it is."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from florence_kit.data.dataset import load_source


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.new("RGB", (32 + i, 24), (10 * i, 0, 0)).save(folder / f"img{i}.png")
            rows.append({"image": f"img{i}.png", "prefix": f"<DocVQA>what is {i}?", "suffix": str(i)})
        (folder / "annotations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_split_folders_load_with_their_own_images(tmp_path: Path):
    ds = load_source(str(make_folder(tmp_path / "data", {"train": 3, "valid": 2, "test": 1})))
    assert sorted(ds) == ["test", "train", "validation"]  # "valid" is the validation split
    assert ds["train"].column_names == ["image", "prefix", "suffix"]  # not an image folder with a `label`
    row = ds["validation"][1]
    assert row["prefix"] == "<DocVQA>what is 1?" and row["suffix"] == "1"
    assert row["image"].size == (33, 24)  # valid/img1.png, not train/img1.png
