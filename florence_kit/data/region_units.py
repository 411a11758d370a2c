"""Data for the tasks whose examples are objects or phrases, not images: segmentation, region-in tasks, open-vocabulary
detection; and region proposal (one example per image, boxes without labels).

- ``segmentation`` (``<REFERRING_EXPRESSION_SEGMENTATION>``) and ``open-vocab-od`` (``<OPEN_VOCABULARY_DETECTION>``):
  one example per phrase of an image; its target holds every object the phrase names. An object's phrases come from
  its ``phrase`` key (a string or a list: RefCOCO gives several expressions per object, each its own example); an
  object without that key is named by its class (``category``), so a COCO instance-segmentation folder gives
  "segment every cat" examples. An object whose phrase is present but null or blank is counted and left out.
- ``region-segmentation``, ``region-category``, ``region-description``, ``region-ocr`` (``<REGION_TO_*>``): one example
  per object; its box is written into the prompt (``{region}``) and the answer is its polygons, class, phrase (every
  phrase a reference, the first the target) or text. A box with no area inside the image makes no example (counted).
- ``region-proposal``: one example per image, every box, no labels.

Objects live in the ``objects`` column (hub layout: a list of dicts or a dict of lists) with ``bbox``, ``category``,
``segmentation`` and ``phrase`` keys (names set in the task's ``regions:``); ``objects: "."`` reads one object from the
row's own columns (RefCOCO-style rows: one referred object per row). ``segmentation`` is COCO's: a list of flat
polygons ``[x1, y1, x2, y2, ...]`` (one flat list is taken as one polygon) or an RLE ``{size: [h, w], counts}``,
traced into polygons (:mod:`florence_kit.common.masks`); pixels, or 0-1 of the image size when ``box_format`` ends in
``n``. Bad shapes never stop a run: a polygon with under three points is dropped, one partly outside the image is
clipped to it, one with nothing inside dropped, a self-intersecting one kept as drawn; an RLE without a ``size`` is
dropped; holes of RLE masks are filled (Florence-2's polygons have none). All are counted (:class:`ShapeCounts`) and
printed by finetune and eval beside the box counts.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.common.geometry import (
    box_prompt,
    clip_polygon,
    encode_polygons,
    encode_regions,
    loc_tokens,
    polygon_area,
    polygons_box,
    reading_order,
    self_intersects,
)
from florence_kit.data.region_targets import RegionCounts, ShapeCounts, _image_size, clean_box, to_xyxy

PER_PHRASE = ("segmentation", "open-vocab-od")
PER_OBJECT = ("region-segmentation", "region-category", "region-description", "region-ocr")


def shape_counts(counts: RegionCounts) -> ShapeCounts:
    """The polygon counts riding on a dataset's box counts."""
    return counts.shapes


# ---------------------------------------------------------------------------------------------
# Objects


def _object_dicts(value: Any, keys: list[str]) -> list[dict[str, Any]]:
    """Objects as dicts, from a list of dicts or a dict of lists (``datasets.Sequence``; short lists padded)."""
    if value is None:
        return []
    if isinstance(value, dict):
        n = max((len(value.get(k) or []) for k in keys), default=0)
        return [{k: (value.get(k) or [])[i] if i < len(value.get(k) or []) else None for k in keys} for i in range(n)]
    return [o if isinstance(o, dict) else {} for o in value]


def _polygons(segmentation: Any, size: tuple[int, int], normalised: bool, shapes: ShapeCounts) -> list[list[float]]:
    """Clean pixel polygons of one object (maybe none); every bad one counted."""
    from florence_kit.common.masks import rle_to_polygons

    if segmentation is None or (isinstance(segmentation, (list, tuple)) and not segmentation):
        return []
    if isinstance(segmentation, dict):
        if not segmentation.get("size") or segmentation.get("counts") is None:
            shapes.rle_without_size += 1
            return []
        raw, holes = rle_to_polygons(segmentation)
        shapes.holes += holes
    elif all(isinstance(v, (int, float)) for v in segmentation):
        raw = [list(segmentation)]
    else:
        raw = [list(p or []) for p in segmentation]
    out = []
    w, h = size
    for polygon in raw:
        shapes.polygons += 1
        coords = [float(v) * (w if k % 2 == 0 else h) if normalised else float(v) for k, v in enumerate(polygon)]
        if len(coords) < 6:
            shapes.dropped += 1
            shapes.few_points += 1
            continue
        clipped = clip_polygon(coords[: len(coords) // 2 * 2], size)
        crossed = len(clipped) >= 6 and self_intersects(clipped)  # a bow tie's signed area may be 0: it still covers
        if len(clipped) < 6 or (polygon_area(clipped) == 0 and not crossed):  # collinear, or nothing inside the image
            shapes.dropped += 1
            continue
        if clipped != coords:
            shapes.clipped += 1
        shapes.self_intersecting += crossed
        out.append(clipped)
    return out


def _phrases(value: Any) -> list[str]:
    """An object's phrases, blank ones left out: a string, a list of them, or RefCOCO's ``[{raw, sent}, ...]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        return _phrases(value.get("sent") or value.get("raw"))
    if not isinstance(value, (list, tuple)):
        return _phrases(str(value))
    return [phrase for item in value for phrase in _phrases(item)]


def _present(value: Any) -> set[str]:
    """The keys the objects of a row carry (a dict of lists, or the union over a list of dicts)."""
    if isinstance(value, dict):
        return set(value)
    return {k for o in value or [] if isinstance(o, dict) for k in o}


def _objects(regions: dict[str, Any], row: dict[str, Any], size: tuple[int, int], names: list[str] | None,
             counts: RegionCounts) -> list[dict[str, Any]]:
    """Clean objects: ``box`` (xyxy pixels), ``polygons``, ``category`` (str or None), ``phrases``."""
    shapes = shape_counts(counts)
    kind = regions["kind"]
    keys = [regions["bbox"], regions["category"], regions["segmentation"], regions["phrase"]]
    if regions["objects"] == ".":
        raw, present = [{k: row.get(k) for k in keys}], set(row)
    else:
        value = row.get(regions["objects"])
        raw, present = _object_dicts(value, keys), _present(value)
    _check_present(regions, present, raw)
    needs_mask = kind in ("segmentation", "region-segmentation") or (
        kind == "open-vocab-od" and regions.get("shape") == "polygons")
    normalised = regions["box_format"].endswith("n")
    out = []
    for obj in raw:
        polygons = _polygons(obj.get(regions["segmentation"]), size, normalised, shapes) if needs_mask else []
        if needs_mask and not polygons:
            shapes.no_mask += 1
            continue
        box = None
        given = obj.get(regions["bbox"])
        if given is not None and len(given) >= 4:
            box = clean_box(to_xyxy(given, regions["box_format"], size), size, counts)
            if box is not None and len(box) > 4:  # a quadrilateral (OCR lines): its enclosing box
                box = polygons_box([box])
            if box is None and (not polygons or kind not in PER_PHRASE):
                continue  # no area inside the image (counted by clean_box): a region-in prompt cannot be written
        if box is None and polygons:
            box = polygons_box(polygons)
        if box is None:
            counts.boxes += 1
            counts.dropped += 1
            continue
        category = obj.get(regions["category"])
        if isinstance(category, int) and names is not None:
            category = names[category] if 0 <= category < len(names) else None
        category = str(category).strip() if category is not None and str(category).strip() else None
        if regions["phrase"] in present:
            phrases = _phrases(obj.get(regions["phrase"]))
            if not phrases and kind in (*PER_PHRASE, "region-description"):
                shapes.no_phrase += 1  # a referring row without its phrase
                continue
        else:
            phrases = [category] if category else []
        out.append({"box": box, "polygons": polygons, "category": category, "phrases": phrases})
    return out


def _check_present(regions: dict[str, Any], present: set[str], raw: list[dict[str, Any]]) -> None:
    """Objects without the key a kind cannot do without: one line naming it and the fix (as box tasks do)."""
    if not raw:
        return
    kind, need = regions["kind"], []
    if kind in ("segmentation", "region-segmentation") or regions.get("shape") == "polygons":
        need.append("segmentation")
    if kind in ("region-category", "region-ocr"):
        need.append("category")
    if kind == "region-description":
        need.append("phrase")
    if kind in PER_PHRASE and regions["phrase"] not in present:
        need.append("category")  # phrases fall back to class names
    if kind in (*PER_OBJECT, "region-proposal") and regions["segmentation"] not in present:
        need.append("bbox")
    missing = [k for k in need if regions[k] not in present]
    if missing:
        where = "the rows" if regions["objects"] == "." else f"column '{regions['objects']}'"
        names = " or ".join(repr(regions[k]) for k in missing)
        raise UserError(f"{where} have no {names} (keys: {', '.join(sorted(present))}); name yours in the task "
                        f"file's regions: {{{missing[0]}: YOUR_KEY}}")


# ---------------------------------------------------------------------------------------------
# Units: the examples of one row


def region_units(regions: dict[str, Any], row: dict[str, Any], image_column: str, names: list[str] | None,
                 counts: RegionCounts) -> list[dict[str, Any]]:
    """The examples a row gives (see the module doc), each with the fields its templates read: ``target``,
    ``references``, ``region`` (the box as ``<loc_*>`` tokens) and ``phrase``."""
    size = _image_size(row, image_column)
    kind = regions["kind"]
    objects = _objects(regions, row, size, names, counts)
    shapes = shape_counts(counts)
    if (counts.clipped or counts.dropped or shapes.bad) and not counts.warned:
        counts.warned = True
        warnings.warn(f"bad boxes or polygons in the data (first in an image of size {size[0]}x{size[1]}): those "
                      "partly outside the image are clipped, those with no area dropped; finetune and eval print how "
                      "many of each", stacklevel=2)
    units = []
    if kind in PER_PHRASE:
        by_phrase: dict[str, list[dict[str, Any]]] = {}
        for obj in objects:
            for phrase in dict.fromkeys(obj["phrases"]):
                by_phrase.setdefault(phrase, []).append(obj)
        for phrase, members in by_phrase.items():
            units.append(_phrase_unit(kind, regions, phrase, members, size))
    elif kind in PER_OBJECT:
        for obj in objects:
            unit = _object_unit(kind, obj, size)
            if unit is None:  # no class (region-category) or no text (region-ocr) to answer with (box counted)
                counts.dropped += 1
                counts.no_class += 1
                continue
            units.append(unit)
    else:  # region-proposal: the whole image
        boxes = [obj["box"] for obj in objects]
        boxes = [boxes[i] for i in reading_order(boxes)]
        ref = {"size": list(size), "labels": [""] * len(boxes), "boxes": _rounded(boxes)}
        units.append({"target": "".join(loc_tokens(b, size) for b in boxes), "references": [json.dumps(ref)],
                      "region": "", "phrase": ""})
    return units


def _rounded(boxes: list[list[float]]) -> list[list[float]]:
    return [[round(v, 3) for v in b] for b in boxes]


def _phrase_unit(kind: str, regions: dict[str, Any], phrase: str, members: list[dict[str, Any]],
                 size: tuple[int, int]) -> dict[str, Any]:
    order = reading_order([m["box"] for m in members])
    members = [members[i] for i in order]
    boxes = [m["box"] for m in members]
    ref: dict[str, Any] = {"size": list(size), "phrase": phrase, "labels": [phrase] * len(members),
                           "boxes": _rounded(boxes)}
    if kind == "segmentation" or regions.get("shape") == "polygons":
        ref["polygons"] = [[[round(v, 2) for v in p] for p in m["polygons"]] for m in members]
        target = encode_polygons([m["polygons"] for m in members], size, label=phrase if kind != "segmentation" else "")
    else:
        target = encode_regions([phrase] * len(members), boxes, size)
    return {"target": target, "references": [json.dumps(ref)], "region": "", "phrase": phrase}


def _object_unit(kind: str, obj: dict[str, Any], size: tuple[int, int]) -> dict[str, Any] | None:
    region = box_prompt(obj["box"], size)
    if kind == "region-segmentation":
        ref = {"size": list(size), "labels": [obj["category"] or ""], "boxes": _rounded([obj["box"]]),
               "polygons": [[[round(v, 2) for v in p] for p in obj["polygons"]]], "region": region}
        return {"target": encode_polygons([obj["polygons"]], size), "references": [json.dumps(ref)],
                "region": region, "phrase": ""}
    answers = obj["phrases"] if kind == "region-description" else [obj["category"]]
    answers = [a for a in answers if a]
    if not answers:
        return None  # region-category / region-ocr without a class or text
    return {"target": answers[0], "references": answers, "region": region, "phrase": ""}


def unit_index(task: Any, ds: Any, names: list[str] | None, counts: RegionCounts,
               sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, unit) of every example, read without decoding any image (sizes come from :func:`row_sizes`)."""
    regions = task.regions
    keep = [c for c in ds.column_names if c != task.image_column]
    index = []
    for row_number, row in enumerate(ds.select_columns(keep)):
        row = {**row, "width": sizes[row_number][0], "height": sizes[row_number][1]}
        n = len(region_units(regions, row, task.image_column, names, counts))
        index += [(row_number, k) for k in range(n)]
    return index


def row_sizes(ds: Any, image_column: str) -> list[tuple[int, int]]:
    """(width, height) of every row as shown: the ``width``/``height`` columns, else each image file's header
    (EXIF orientations 5-8 swap the sides, as ``datasets`` turns the image upright when it decodes it)."""
    import io

    import datasets
    from PIL import Image

    if {"width", "height"} <= set(ds.column_names):
        return [(int(w), int(h)) for w, h in zip(ds["width"], ds["height"], strict=True)]
    raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    sizes = []
    for value in raw[image_column]:
        value = value[0] if isinstance(value, list) and value else value
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
        with Image.open(source) as im:
            width, height = im.size
            turned = im.getexif().get(0x0112) in {5, 6, 7, 8}
        sizes.append((height, width) if turned else (width, height))
    return sizes
