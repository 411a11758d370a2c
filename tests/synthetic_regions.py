"""Offline detection data: coloured shapes with known boxes and classes, written as COCO, YOLO and hub layouts.

Class names include a hyphen and a digit ("traffic-light", "class 2") because other tools' parsers
lose exactly those. One image in every split has no object (its target is empty). The same scenes can
be written as a COCO folder, a YOLO folder and a ``datasets`` DatasetDict with an ``objects`` column,
so tests can check that the three load to the same examples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CLASSES = ("square", "circle", "traffic-light", "class 2")
FILL = {"square": (220, 30, 30), "circle": (30, 160, 60), "traffic-light": (240, 180, 0), "class 2": (40, 60, 220)}
WORDS = ("cat", "sun", "map", "box", "pen", "cup", "dog", "hat")


@dataclass
class Scene:
    """One picture and its objects: COCO ``xywh`` pixel boxes and class names (or words, for OCR)."""

    name: str
    image: Image.Image
    boxes: list[list[float]]
    labels: list[str]


def draw_shape(draw: ImageDraw.ImageDraw, label: str, box: list[float]) -> None:
    x, y, w, h = box
    xyxy = [x, y, x + w - 1, y + h - 1]
    if label == "circle":
        draw.ellipse(xyxy, fill=FILL[label])
    elif label == "class 2":
        draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=FILL[label])
    elif label == "traffic-light":
        draw.rectangle(xyxy, fill=FILL[label])
        draw.ellipse([x + w / 4, y + h / 8, x + 3 * w / 4, y + h / 2], fill=(200, 0, 0))
    else:
        draw.rectangle(xyxy, fill=FILL[label])


def shape_scenes(n: int, seed: int = 0, size: int = 128) -> list[Scene]:
    """``n`` scenes of 1-3 non-overlapping shapes (scene 0 is empty), each box a whole number of pixels."""
    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        count = 0 if i == 0 else rng.randint(1, 3)
        cells = rng.sample([(cx, cy) for cx in range(2) for cy in range(2)], count)
        for cx, cy in cells:
            w, h = rng.randint(20, 50), rng.randint(20, 50)
            x = cx * size // 2 + rng.randint(0, size // 2 - w)
            y = cy * size // 2 + rng.randint(0, size // 2 - h)
            label = rng.choice(CLASSES)
            draw_shape(draw, label, [x, y, w, h])
            boxes.append([float(x), float(y), float(w), float(h)])
            labels.append(label)
        scenes.append(Scene(f"img_{seed}_{i:03d}", image, boxes, labels))
    return scenes


def text_scenes(n: int, seed: int = 0, size: int = 128) -> list[Scene]:
    """Scenes of 1-2 words at known places (for OCR with regions); boxes from the font's text box."""
    rng = random.Random(seed)
    font = ImageFont.load_default(size=16)
    scenes = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        boxes, labels = [], []
        for row in range(rng.randint(1, 2)):
            word = rng.choice(WORDS)
            x, y = rng.randint(2, 60), 10 + row * 60 + rng.randint(0, 20)
            left, top, right, bottom = draw.textbbox((x, y), word, font=font)
            draw.text((x, y), word, fill="black", font=font)
            boxes.append([float(left), float(top), float(right - left), float(bottom - top)])
            labels.append(word)
        scenes.append(Scene(f"txt_{seed}_{i:03d}", image, boxes, labels))
    return scenes


def write_coco(scenes_by_split: dict[str, list[Scene]], root: Path, classes: tuple[str, ...] = CLASSES,
               masks: str | None = None) -> Path:
    """``root/annotations/instances_<split>.json`` + ``root/images/<split>/*.png`` (COCO's own layout).

    Category ids start at 1 and skip numbers, as COCO's do, so the loader must map them by name. ``masks``
    adds each object's ``segmentation``: ``"polygons"`` (COCO polygon lists) or ``"rle"`` (compressed RLE).
    """
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": 3 * k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)]
    ids = {c["name"]: c["id"] for c in categories}
    for split, scenes in scenes_by_split.items():
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k, scene in enumerate(scenes):
            scene.image.save(folder / f"{scene.name}.png")
            images.append({"id": 100 + k, "file_name": f"{scene.name}.png", "width": scene.image.width,
                           "height": scene.image.height})
            for box, label in zip(scene.boxes, scene.labels, strict=True):
                annotations.append({"id": len(annotations) + 1, "image_id": 100 + k, "category_id": ids[label],
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
                if masks:
                    annotations[-1]["segmentation"] = _mask(shape_polygon(label, box), scene.image.size, masks)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _mask(polygon: list[float], size: tuple[int, int], kind: str) -> object:
    if kind == "polygons":
        return [polygon]
    from pycocotools import mask as mask_utils

    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size[1], size[0]))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_yolo(scenes_by_split: dict[str, list[Scene]], root: Path, classes: tuple[str, ...] = CLASSES,
               names_file: str = "data.yaml") -> Path:
    """``root/images/<split>/*.png`` + ``root/labels/<split>/*.txt`` (class cx cy w h, normalised)."""
    import yaml

    for split, scenes in scenes_by_split.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for scene in scenes:
            scene.image.save(root / "images" / split / f"{scene.name}.png")
            w, h = scene.image.size
            lines = [f"{classes.index(label)} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                     for (x, y, bw, bh), label in zip(scene.boxes, scene.labels, strict=True)]
            (root / "labels" / split / f"{scene.name}.txt").write_text("".join(line + "\n" for line in lines))
    if names_file == "classes.txt":
        (root / "classes.txt").write_text("".join(c + "\n" for c in classes))
    else:
        (root / names_file).write_text(yaml.safe_dump({"names": list(classes), "nc": len(classes)}))
    return root


def hub_splits(scenes_by_split: dict[str, list[Scene]], classes: tuple[str, ...] = CLASSES,
               text: bool = False):
    """The hub detection layout (cppe-5's): ``image``, ``width``, ``height``, ``objects`` {bbox xywh, category}.

    With ``text`` the objects are OCR lines instead: ``objects`` {quad (8 pixel numbers), text}.
    """
    import datasets

    if text:
        objects = datasets.Sequence({"quad": datasets.Sequence(datasets.Value("float32"), length=8),
                                     "text": datasets.Value("string")})
    else:
        objects = datasets.Sequence({"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                                     "category": datasets.ClassLabel(names=list(classes))})
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                  "caption": datasets.Value("string"), "objects": objects})
    out = {}
    for split, scenes in scenes_by_split.items():
        rows = []
        for scene in scenes:
            if text:
                quads = [[x, y, x + w, y, x + w, y + h, x, y + h] for x, y, w, h in scene.boxes]
                obj = {"quad": quads, "text": scene.labels}
            else:
                obj = {"bbox": scene.boxes, "category": [classes.index(label) for label in scene.labels]}
            rows.append({"image": scene.image, "image_id": scene.name, "width": scene.image.width,
                         "height": scene.image.height, "caption": " and ".join(dict.fromkeys(scene.labels)),
                         "objects": obj})
        out[split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(out)


PHRASES = {"square": "the red square", "circle": "the green circle", "traffic-light": "the yellow traffic-light",
           "class 2": "the blue triangle"}


def shape_polygon(label: str, box: list[float]) -> list[float]:
    """The outline :func:`draw_shape` fills, as one flat pixel polygon (a circle as a 32-gon; the traffic light's
    lamp is inside its body, so its outline is the body's)."""
    import math

    x, y, w, h = box
    if label == "circle":
        cx, cy, rx, ry = x + w / 2, y + h / 2, w / 2, h / 2
        return [round(v, 2) for k in range(32) for v in (cx + rx * math.cos(2 * math.pi * k / 32),
                                                          cy + ry * math.sin(2 * math.pi * k / 32))]
    if label == "class 2":
        return [x + w / 2, y, x + w, y + h, x, y + h]
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def segmentation_splits(scenes_by_split: dict[str, list[Scene]], classes: tuple[str, ...] = CLASSES,
                        phrases: bool = False):
    """The hub layout with masks: ``objects`` {bbox xywh, category, segmentation (a list of flat polygons)}, plus
    ``phrase`` per object with ``phrases`` (a referring expression naming its colour: "the red square")."""
    import datasets

    inner = {"bbox": datasets.Sequence(datasets.Value("float32"), length=4),
             "category": datasets.ClassLabel(names=list(classes)),
             "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("float32")))}
    if phrases:
        inner["phrase"] = datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"),
                                  "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                  "objects": datasets.Sequence(inner)})
    out = {}
    for split, scenes in scenes_by_split.items():
        rows = []
        for scene in scenes:
            obj = {"bbox": scene.boxes, "category": [classes.index(label) for label in scene.labels],
                   "segmentation": [[shape_polygon(label, box)] for box, label in zip(scene.boxes, scene.labels,
                                                                                      strict=True)]}
            if phrases:
                obj["phrase"] = [PHRASES[label] for label in scene.labels]
            rows.append({"image": scene.image, "image_id": scene.name, "width": scene.image.width,
                         "height": scene.image.height, "objects": obj})
        out[split] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(out)
