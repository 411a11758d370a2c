"""Auto-labelling: ``predict --format coco|yolo|florence-jsonl`` writes its answers as a dataset folder.

Each layout is the one :mod:`florence_kit.data.region_targets` and :mod:`florence_kit.data.dataset` read, so
``finetune od --dataset OUT`` (COCO, YOLO), ``finetune florence-jsonl --dataset OUT`` or, for a text task,
``finetune caption --dataset OUT`` trains on it unchanged:

- ``coco``: ``OUT/train/_annotations.coco.json`` (boxes as COCO ``xywh`` pixels) and the images beside it;
- ``yolo``: ``OUT/images/train/``, ``OUT/labels/train/*.txt`` (class cx cy w h, fractions), ``OUT/data.yaml``;
- ``florence-jsonl``: ``OUT/train/annotations.jsonl`` (``image``, ``prefix`` the prompt, ``suffix`` the raw answer
  with its ``<loc_*>`` tokens) and the images beside it: any task, region or text. A text task's answers (caption,
  ocr) are also each row's ``text``, so ``finetune caption --dataset OUT`` or ``finetune ocr --dataset OUT`` trains
  on them, and ``OUT/train/metadata.jsonl`` (``file_name``, ``text``) makes the folder an imagefolder as
  ``datasets`` reads it.

Images are hard-linked where the filesystem allows (symlinked otherwise), or copied with ``copy_images``; an image
from a dataset row is written as a PNG. Names are the input's position and its file name, so they never collide.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError

SPLIT = "train"


def _labels(answer: dict[str, Any]) -> list[str]:
    return list(answer.get("labels") or answer.get("bboxes_labels") or [])


def boxes_of(rec: dict[str, Any]) -> list[tuple[list[float], str]]:
    """(x1, y1, x2, y2 pixels, label) of a record's parsed answer; a record without boxes has none, and a box with no
    area or no label is left out (a dataset reader would drop it anyway)."""
    answer = rec.get("answer")
    if not isinstance(answer, dict):
        return []
    boxes = answer.get("bboxes") or []
    labels = _labels(answer)
    return [(list(map(float, box)), str(label).strip()) for box, label in zip(boxes, labels, strict=False)
            if len(box) == 4 and str(label).strip() and box[2] > box[0] and box[3] > box[1]]


def _image_name(index: int, rec: dict[str, Any]) -> str:
    source = rec.get("path")
    name = Path(source).name if source else f"row{rec.get('row', index)}.png"
    return f"{index:06d}_{name}"


def _place_image(rec: dict[str, Any], target: Path, rows: Any, image_column: str, copy_images: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    source = rec.get("path")
    if source:
        source_path = Path(source).resolve()
        if copy_images:
            shutil.copyfile(source_path, target)
            return
        try:
            os.link(source_path, target)
        except OSError:  # another filesystem: a symbolic link
            target.symlink_to(source_path)
        return
    from florence_kit.evaluate.batch import ImageRef, open_image

    open_image(ImageRef(str(rec["row"]), row=int(rec["row"])), rows, image_column).save(target)


def write_dataset(out: Path, fmt: str, records: list[dict[str, Any]], *, rows: Any = None,
                  image_column: str = "image", copy_images: bool = False) -> None:
    """``records`` (the merged answers, in input order) as a dataset folder in layout ``fmt`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    names = [_image_name(i, rec) for i, rec in enumerate(records)]
    if fmt in ("coco", "yolo") and records and all(not isinstance(r.get("answer"), dict) for r in records):
        raise UserError(f"--format {fmt} writes boxes, but the task's answers are text: use --format florence-jsonl")
    if fmt == "florence-jsonl":
        folder = out / SPLIT
        texts = bool(records) and all(isinstance(rec.get("answer"), str) for rec in records)  # caption, ocr, ...
        lines, metadata = [], []
        for name, rec in zip(names, records, strict=True):
            _place_image(rec, folder / name, rows, image_column, copy_images)
            lines.append({"image": name, "prefix": rec["prompt"], "suffix": rec["text"],
                          **({"text": rec["answer"]} if texts else {})})
            metadata.append({"file_name": name, "text": rec["answer"]})
        _write(folder / "annotations.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
        if texts:  # an imagefolder too: datasets' "imagefolder" loader and text-to-image trainers read it
            _write(folder / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in metadata))
        return
    classes = sorted({label for rec in records for _, label in boxes_of(rec)})
    if fmt == "coco":
        folder = out / SPLIT
        images, annotations = [], []
        for image_id, (name, rec) in enumerate(zip(names, records, strict=True), start=1):
            _place_image(rec, folder / name, rows, image_column, copy_images)
            images.append({"id": image_id, "file_name": name, "width": rec["width"], "height": rec["height"]})
            for (x1, y1, x2, y2), label in boxes_of(rec):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": classes.index(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}
        _write(folder / "_annotations.coco.json", json.dumps(coco, ensure_ascii=False))
        return
    if fmt == "yolo":
        import yaml

        for name, rec in zip(names, records, strict=True):
            _place_image(rec, out / "images" / SPLIT / name, rows, image_column, copy_images)
            width, height = float(rec["width"]), float(rec["height"])
            lines = [f"{classes.index(label)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                     f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n" for (x1, y1, x2, y2), label in boxes_of(rec)]
            label_file = out / "labels" / SPLIT / Path(name).with_suffix(".txt")
            label_file.parent.mkdir(parents=True, exist_ok=True)
            _write(label_file, "".join(lines))
        (out / "labels" / SPLIT).mkdir(parents=True, exist_ok=True)
        _write(out / "data.yaml", yaml.safe_dump({"names": classes}, allow_unicode=True))
        return
    raise UserError(f"unknown --format '{fmt}'")


def _write(path: Path, text: str) -> None:
    from florence_kit.common.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
