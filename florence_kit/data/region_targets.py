"""Data for region tasks (``od``, ``grounding``, ``region-caption``, ``ocr-region``): boxes in, ``<loc_*>`` targets out.

Sources: a COCO folder (an annotation JSON with ``images``/``annotations``/``categories`` and the image
files), a YOLO folder (``images/`` + ``labels/`` txt files, class names from ``data.yaml`` or
``classes.txt``), or any dataset with an ``objects`` column holding ``bbox`` + ``category`` (the layout
of the hub's detection sets, e.g. cppe-5). COCO and YOLO folders are read into that same layout, with
boxes as COCO ``xywh`` pixels, so one task default (``box_format: xywh``) fits all three; a source
with another convention says so in its task file or with ``--box-format``.

Class names go through the dataset's label names (a ``ClassLabel`` feature) when categories are
integers. Images without boxes are kept (their target is empty). Bad boxes never crash a run: a box
partly outside the image is clipped to it, one with no area left (negative size, entirely outside)
is dropped, and both are counted (:class:`RegionCounts`); so is a box without a class (null, blank, or
unpaired when the ``bbox`` and ``category`` lists differ in length), which is dropped. ``finetune`` and
``eval`` print the counts of one pass through the data (:func:`bad_box_lines`).

The task's ``regions:`` mapping (checked by
:func:`florence_kit.tasks.region_block.check_regions`) names the kind and where the boxes live.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.common.geometry import encode_regions, quad_to_box, reading_order

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------
# Boxes


def to_xyxy(box: Sequence[float], box_format: str, size: tuple[int, int]) -> list[float]:
    """One box in pixels ``[x1, y1, x2, y2]`` (or a quadrilateral's 8 pixel numbers) from ``box_format``."""
    w, h = size
    b = [float(v) for v in box]
    if box_format == "xyxy":
        return b[:4]
    if box_format == "xywh":
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    if box_format == "xyxyn":
        return [b[0] * w, b[1] * h, b[2] * w, b[3] * h]
    if box_format == "xywhn":
        return [b[0] * w, b[1] * h, (b[0] + b[2]) * w, (b[1] + b[3]) * h]
    if box_format == "cxcywhn":
        return [(b[0] - b[2] / 2) * w, (b[1] - b[3] / 2) * h, (b[0] + b[2] / 2) * w, (b[1] + b[3] / 2) * h]
    if box_format in {"quad", "quadn"}:
        if len(b) == 4:  # an axis-aligned box given for a quadrilateral task: its four corners
            x1, y1, x2, y2 = b
            b = [x1, y1, x2, y1, x2, y2, x1, y2]
        scale = (w, h) if box_format == "quadn" else (1.0, 1.0)
        return [v * scale[k % 2] for k, v in enumerate(b[:8])]
    raise ValueError(f"unknown box format {box_format}")


@dataclass
class ShapeCounts:
    """Polygons seen, clipped, dropped (under three points, nothing inside the image), self-intersecting (kept);
    RLE masks without a size (dropped), holes filled; objects without a mask or with a blank phrase (left out)."""

    polygons: int = 0
    clipped: int = 0
    dropped: int = 0
    few_points: int = 0
    self_intersecting: int = 0
    holes: int = 0
    rle_without_size: int = 0
    no_mask: int = 0
    no_phrase: int = 0

    def restart(self) -> None:
        """Zero the counts for a new pass through the data."""
        for name in ("polygons", "clipped", "dropped", "few_points", "self_intersecting", "holes", "rle_without_size",
                     "no_mask", "no_phrase"):
            setattr(self, name, 0)

    @property
    def bad(self) -> bool:
        """Whether anything is worth a warning line."""
        return bool(self.clipped or self.dropped or self.self_intersecting or self.holes or self.rle_without_size
                    or self.no_mask or self.no_phrase)

    def __str__(self) -> str:
        return (f"{self.polygons} polygons: {self.clipped} clipped to the image, {self.dropped} dropped "
                f"({self.few_points} with under 3 points, {self.dropped - self.few_points} with nothing inside the "
                f"image), {self.self_intersecting} self-intersecting (kept as drawn), {self.holes} holes filled, "
                f"{self.rle_without_size} RLE masks without a size (dropped); {self.no_mask} objects without a mask, "
                f"{self.no_phrase} with a blank phrase (left out)")


@dataclass
class RegionCounts:
    """Boxes seen, clipped to the image, and dropped: with no area inside it, without a class (or without a
    box), or with a class id outside the label names."""

    boxes: int = 0
    clipped: int = 0
    dropped: int = 0  # all three kinds
    no_class: int = 0
    unknown_class: int = 0
    warned: bool = False
    unnamed_ids: bool = False  # integer categories met without label names (warned once)
    shapes: ShapeCounts = field(default_factory=ShapeCounts)  # polygons (segmentation tasks)

    def restart(self) -> None:
        """Zero the counts for a new pass through the data (a pass reads every box once); warnings stay once."""
        self.boxes = self.clipped = self.dropped = self.no_class = self.unknown_class = 0
        self.shapes.restart()

    def __str__(self) -> str:
        no_area = self.dropped - self.no_class - self.unknown_class
        return (f"{self.boxes} boxes: {self.clipped} clipped to the image, {self.dropped} dropped ({no_area} with "
                f"no area, {self.no_class} without a class, {self.unknown_class} with a class id outside the label "
                "names)")


def bad_box_lines(dataset: Any) -> list[str]:
    """One line per task of ``dataset`` (a TaskDataset or a mix) whose data had bad boxes, from its region counts:
    read them right after a full ``texts()`` pass (the length preflight), before training reads rows again."""
    parts = getattr(dataset, "parts", [dataset])
    lines = []
    for part in parts:
        counts = getattr(part, "region_counts", None)
        where = f" of {part.task.name}" if len(parts) > 1 else ""
        if counts is not None and (counts.clipped or counts.dropped):
            lines.append(f"warning: bad boxes in the data{where}: {counts}")
        shapes = getattr(counts, "shapes", None)  # segmentation tasks (florence_kit.data.region_units)
        if shapes is not None and shapes.bad:
            lines.append(f"warning: bad polygons in the data{where}: {shapes}")
    return lines


def clean_box(coords: list[float], size: tuple[int, int], counts: RegionCounts) -> list[float] | None:
    """Clip to the image; None (counted as dropped) when nothing of the box is left inside it."""
    w, h = size
    counts.boxes += 1
    clipped = [min(max(v, 0.0), float(w if k % 2 == 0 else h)) for k, v in enumerate(coords)]
    x1, y1, x2, y2 = quad_to_box(clipped) if len(clipped) > 4 else clipped
    if len(clipped) == 4 and (coords[2] < coords[0] or coords[3] < coords[1]):
        counts.dropped += 1  # negative width or height: not a box
        return None
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        counts.dropped += 1
        return None
    if clipped != coords:
        counts.clipped += 1
    return clipped


def label_names(features: Any, regions: dict[str, Any]) -> list[str] | None:
    """The dataset's class names when categories are ``ClassLabel`` integers (hub sets, our COCO/YOLO reads)."""
    import datasets

    feature = (features or {}).get(regions["objects"])
    if isinstance(feature, datasets.Sequence):
        feature = feature.feature
    if isinstance(feature, list) and feature:
        feature = feature[0]
    if isinstance(feature, dict):
        inner = feature.get(regions["category"])
        if isinstance(inner, (datasets.Sequence, list)):
            inner = inner.feature if isinstance(inner, datasets.Sequence) else inner[0]
        if isinstance(inner, datasets.ClassLabel):
            return list(inner.names)
    return None


def _check_keys(found: set[str], regions: dict[str, Any]) -> None:
    """Objects without the task's box or class key: a clear error, where every target used to be silently empty."""
    missing = [k for k in (regions["bbox"], regions["category"]) if k not in found]
    if missing and found:
        keys = ", ".join(sorted(found))
        raise UserError(f"column '{regions['objects']}' has no {' or '.join(repr(k) for k in missing)} (its keys: "
                        f"{keys}); name yours in a task file: regions: {{bbox: ..., category: ...}}")


def _objects(value: Any, regions: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(boxes, categories) from a dict of lists (``datasets.Sequence``) or a list of dicts."""
    bkey, ckey = regions["bbox"], regions["category"]
    if value is None:
        return [], []
    if isinstance(value, dict):
        _check_keys(set(value), regions)
        return list(value.get(bkey) or []), list(value.get(ckey) or [])
    for o in value:
        _check_keys(set(o) if isinstance(o, dict) else {"(not a mapping)"}, regions)
    return [o.get(bkey) for o in value], [o.get(ckey) for o in value]


def _image_size(row: dict[str, Any], image_column: str) -> tuple[int, int]:
    image = row.get(image_column)
    image = image[0] if isinstance(image, list) and image else image
    if hasattr(image, "size"):
        return tuple(image.size)  # type: ignore[return-value]
    if row.get("width") and row.get("height"):
        return int(row["width"]), int(row["height"])
    raise UserError("a region task needs each row's image (or width and height columns) to place its boxes")


def region_fields(regions: dict[str, Any], row: dict[str, Any], image_column: str, names: list[str] | None,
                  counts: RegionCounts) -> dict[str, Any]:
    """``target`` (the ``<loc_*>`` text), ``references`` (one JSON string: size, labels, pixel boxes) and
    ``caption`` (grounding's phrase input: the row's caption, or the phrases joined) for one row."""
    size = _image_size(row, image_column)
    raw_boxes, categories = _objects(row.get(regions["objects"]), regions)
    unpaired = abs(len(raw_boxes) - len(categories))  # a box without a class (or a class without a box)
    counts.boxes += unpaired
    counts.dropped += unpaired
    counts.no_class += unpaired
    labels, boxes = [], []
    for box, category in zip(raw_boxes, categories, strict=False):
        if box is None or len(box) < 4 or category is None or not str(category).strip():
            counts.boxes += 1  # no box, or no class to name it by (a null would be learnt as the label "None")
            counts.dropped += 1
            counts.no_class += 1
            continue
        if isinstance(category, int) and names is not None:
            if not 0 <= category < len(names):
                counts.boxes += 1
                counts.unknown_class += 1
                counts.dropped += 1
                continue
            category = names[category]
        elif isinstance(category, int) and not counts.unnamed_ids:
            counts.unnamed_ids = True
            warnings.warn("class ids without class names (no ClassLabel feature, e.g. JSONL data): the model learns "
                          "the labels '0', '1', ...; write the names in the category field, or use a COCO or YOLO "
                          "folder", stacklevel=2)
        coords = clean_box(to_xyxy(box, regions["box_format"], size), size, counts)
        if coords is not None:
            labels.append(str(category).strip())
            boxes.append(coords)
    if (counts.clipped or counts.dropped) and not counts.warned:  # once per dataset: the counts keep going
        counts.warned = True
        warnings.warn(f"bad boxes in the data (first in an image of size {size[0]}x{size[1]}): those partly "
                      "outside the image are clipped, those with no area or no class dropped; finetune and eval "
                      "print how many of each", stacklevel=2)
    order = reading_order(boxes)
    labels, boxes = [labels[i] for i in order], [boxes[i] for i in order]
    caption = row.get(regions["caption"])
    if regions["kind"] == "grounding" and not isinstance(caption, str):
        caption = ", ".join(dict.fromkeys(labels))
    reference = {"size": list(size), "labels": labels, "boxes": [[round(v, 3) for v in b] for b in boxes]}
    if regions["kind"] == "ocr-region":
        reference["quads"] = reference.pop("boxes")
    return {"target": encode_regions(labels, boxes, size), "references": [json.dumps(reference)],
            "caption": caption or ""}


# ---------------------------------------------------------------------------------------------
# COCO and YOLO folders -> the hub detection layout


def _features(names: list[str], masks: bool = False) -> Any:
    import datasets

    objects = {"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
               "category": datasets.ClassLabel(names=names)}
    if masks:  # segmentation tasks: each object's flat polygons (COCO's RLE masks traced into polygons on reading)
        objects["segmentation"] = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
    return datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": datasets.Sequence(objects),
    })


def _coco_polygons(segmentation: Any, stats: dict[str, int]) -> list[list[float]]:
    """An annotation's ``segmentation`` as flat polygons: COCO's polygon lists as they are, an RLE mask traced (its
    holes filled and counted: Florence-2's polygons have none; one without a ``size`` counted and left out)."""
    if not segmentation:
        return []
    if isinstance(segmentation, dict):
        if not segmentation.get("size") or segmentation.get("counts") is None:
            stats["rle_without_size"] += 1
            return []
        from florence_kit.common.masks import rle_to_polygons

        polygons, holes = rle_to_polygons(segmentation)
        stats["holes"] += holes
        return polygons
    if all(isinstance(v, (int, float)) for v in segmentation):
        return [[float(v) for v in segmentation]]
    return [[float(v) for v in p] for p in segmentation if isinstance(p, list)]


def _split_name(*parts: str) -> str:
    for part in parts:
        stem = part.lower()
        for split, keys in (("validation", ("val", "dev")), ("test", ("test",)), ("train", ("train",))):
            if any(k in stem for k in keys):
                return split
    return "train"


def _coco_files(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Annotation JSONs up to two folders deep; JSON-lines files (datasets' own format) are skipped unread."""
    found = []
    paths = sorted({*root.glob("*.json"), *root.glob("*/*.json"), *root.glob("*/*/*.json")})
    for path in paths:
        try:
            with path.open(encoding="utf-8") as handle:
                first = handle.readline()
                if not first.lstrip().startswith("{"):
                    continue
                try:
                    data = json.loads(first)  # a minified COCO file is one line; so is each row of JSONL
                except ValueError:
                    handle.seek(0)
                    data = json.load(handle)  # pretty-printed
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"images", "annotations", "categories"} <= set(data):
            found.append((path, data))
    return found


def _find_image(root: Path, json_path: Path, file_name: str) -> Path | None:
    candidates = [json_path.parent, root, root / "images"]
    candidates += [p for p in sorted((root / "images").glob("*")) if p.is_dir()] if (root / "images").is_dir() else []
    candidates += [root / json_path.stem.split("_", 1)[-1]]  # instances_train2017.json -> train2017/
    for folder in candidates:
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def _shown_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as shown, from its header: EXIF orientations 5-8 (a phone held
    upright) swap the stored sides, and ``datasets`` turns the image upright when it decodes it."""
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        width, height = im.size
        turned = im.getexif().get(0x0112) in {5, 6, 7, 8}
    return (height, width) if turned else (width, height)


def load_coco(root: Path) -> Any:
    """A ``DatasetDict`` from a COCO folder: one split per annotation file (split from its name or folder)."""
    import datasets

    files = _coco_files(root)
    names = sorted({c["name"] for _, data in files for c in data["categories"]})
    splits: dict[str, list[dict[str, Any]]] = {}
    missing = dropped = 0
    masks = any(a.get("segmentation") for _, data in files for a in data["annotations"])
    stats = {"rle_without_size": 0, "holes": 0}
    for path, data in files:
        cat_name = {c["id"]: c["name"] for c in data["categories"]}
        per_image: dict[Any, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(ann["image_id"], []).append(ann)
        split = _split_name(path.stem, path.parent.name)
        for image in data["images"]:
            file = _find_image(root, path, image["file_name"])
            if file is None:
                missing += 1
                continue
            anns = [a for a in per_image.get(image["id"], [])
                    if a.get("category_id") in cat_name and a.get("bbox") and not a.get("iscrowd")]
            dropped += len(per_image.get(image["id"], [])) - len(anns)
            width, height = int(image.get("width") or 0), int(image.get("height") or 0)
            if not (width and height):  # some exporters leave them out: without them no target could be written
                width, height = _shown_size(file)
            objects = {"bbox": [[float(v) for v in a["bbox"]][:4] for a in anns],
                       "category": [names.index(cat_name[a["category_id"]]) for a in anns]}
            if masks:
                objects["segmentation"] = [_coco_polygons(a.get("segmentation"), stats) for a in anns]
            splits.setdefault(split, []).append({
                "image": str(file), "image_id": str(image["id"]), "width": width, "height": height,
                "objects": objects,
            })
    if missing or dropped:
        warnings.warn(f"{root}: {missing} image file(s) not found, {dropped} annotation(s) without a known "
                      "category or a bbox, or marked iscrowd, were left out", stacklevel=2)
    if stats["holes"] or stats["rle_without_size"]:
        warnings.warn(f"{root}: RLE masks: {stats['holes']} hole(s) filled (Florence-2's polygons have none), "
                      f"{stats['rle_without_size']} mask(s) without a size left out", stacklevel=2)
    features = _features(names, masks)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows, features=features) for s, rows in splits.items()})


def _yolo_names(root: Path) -> list[str] | None:
    import yaml

    for name in ("data.yaml", "dataset.yaml", "data.yml"):
        if (root / name).is_file():
            data = yaml.safe_load((root / name).read_text(encoding="utf-8")) or {}
            names = data.get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
    for name in ("classes.txt", "obj.names"):
        if (root / name).is_file():
            return [line.strip() for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return None


def load_yolo(root: Path) -> Any:
    """A ``DatasetDict`` from a YOLO folder (``images/<split>`` + ``labels/<split>``, or ``<split>/images``)."""
    import datasets

    names = _yolo_names(root)
    if names is None:
        raise UserError(f"YOLO folder '{root}' has no class names: add data.yaml (names: [...]) or classes.txt")
    splits: dict[str, list[dict[str, Any]]] = {}
    bad = 0
    for image_path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        parts = list(image_path.relative_to(root).parts)
        if "images" not in parts:
            continue
        k = len(parts) - 1 - parts[::-1].index("images")
        label_path = root.joinpath(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")
        split = _split_name(*(parts[k + 1:-1] + parts[:k]))
        width, height = _shown_size(image_path)  # YOLO's numbers are fractions of the upright image
        boxes, cats = [], []
        lines = label_path.read_text(encoding="utf-8").splitlines() if label_path.is_file() else []
        for line in lines:
            fields = line.split()
            if not fields:
                continue
            try:
                cls, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:5])
            except (ValueError, TypeError):
                bad += 1
                continue
            if not 0 <= cls < len(names) or len(fields) < 5:
                bad += 1
                continue
            # to a thousandth of a pixel: 6-digit normalised text must not push an integer edge across a bin
            boxes.append([round(v, 3) for v in ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height)])
            cats.append(cls)
        splits.setdefault(split, []).append({
            "image": str(image_path), "image_id": image_path.stem, "width": width, "height": height,
            "objects": {"bbox": boxes, "category": cats},
        })
    if bad:
        warnings.warn(f"{root}: {bad} label line(s) malformed or with an unknown class were left out", stacklevel=2)
    if not splits:
        raise UserError(f"YOLO folder '{root}' has no images under an images/ folder")
    features = _features(names)
    return datasets.DatasetDict({s: datasets.Dataset.from_list(rows, features=features) for s, rows in splits.items()})


def load_region_folder(root: Path) -> Any | None:
    """A COCO or YOLO folder read into the hub detection layout; None when the folder is neither."""
    if _yolo_names(root) is not None and any(p.is_dir() for p in root.rglob("labels")):
        return load_yolo(root)
    if _coco_files(root):
        return load_coco(root)
    return None
