"""The ``regions:`` block of a task file (od, grounding, segmentation, region-category, ...) and ``--box-format``.

Checked when task files are read, so it sits with the task spec; :mod:`florence_kit.data.region_targets`
turns the rows of such a task into ``<loc_*>`` targets.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from florence_kit.common.errors import UserError

KINDS = ("od", "grounding", "region-caption", "ocr-region", "segmentation", "region-segmentation", "region-category",
         "region-description", "region-ocr", "open-vocab-od", "region-proposal")
BOX_FORMATS = ("xywh", "xyxy", "xywhn", "xyxyn", "cxcywhn", "quad", "quadn")
SHAPES = ("boxes", "polygons")
REGION_KEYS = {"kind", "box_format", "objects", "bbox", "category", "caption", "segmentation", "phrase", "shape"}
OCR_KINDS = ("ocr-region", "region-ocr")  # objects are text lines: {quad, text}
BOX_KINDS = ("od", "grounding", "region-caption", "ocr-region")  # one example per image, boxes in the target
UNIT_KINDS = tuple(k for k in KINDS if k not in BOX_KINDS)  # examples per object / phrase (data.region_units)


class BoxFormat(str, enum.Enum):
    """How a source writes its boxes (``--box-format``): pixels ``xywh`` (COCO) / ``xyxy``; ``n`` = 0-1 of the
    image size (``cxcywhn`` is YOLO's); ``quad`` = 8 numbers x1 y1 ... x4 y4 (OCR lines)."""

    xywh = "xywh"
    xyxy = "xyxy"
    xywhn = "xywhn"
    xyxyn = "xyxyn"
    cxcywhn = "cxcywhn"
    quad = "quad"
    quadn = "quadn"


def check_regions(value: Any, origin: str) -> dict[str, Any]:
    """The task file's ``regions:`` mapping with defaults filled in; every problem names the field.

    The kinds after the four box kinds (see :mod:`florence_kit.data.region_units`) also name where an object's
    mask (``segmentation``) and phrase (``phrase``) live, and ``open-vocab-od`` whether its targets are boxes or
    polygons (``shape``); ``objects: "."`` reads one object from each row's own columns (RefCOCO-style rows)."""
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise UserError(f"{origin}: 'regions' must be a mapping with at least 'kind' ({', '.join(KINDS)})")
    bad = set(value) - REGION_KEYS
    if bad:
        raise UserError(f"{origin}: unknown regions key(s) {sorted(bad)}; allowed: {sorted(REGION_KEYS)}")
    kind = str(value.get("kind", ""))
    if kind not in KINDS:
        raise UserError(f"{origin}: regions.kind must be one of {', '.join(KINDS)}, got '{kind}'")
    ocr = kind in OCR_KINDS
    out = {"kind": kind, "box_format": "quad" if ocr else "xywh", "objects": "objects",
           "bbox": "quad" if ocr else "bbox", "category": "text" if ocr else "category", "caption": "caption"}
    if kind not in BOX_KINDS:
        out.update({"segmentation": "segmentation", "phrase": "phrase"})
    if kind == "open-vocab-od":
        out["shape"] = "boxes"
    if kind in BOX_KINDS and set(value) & {"segmentation", "phrase"}:
        raise UserError(f"{origin}: regions.segmentation and regions.phrase apply to the kinds after "
                        f"{', '.join(BOX_KINDS)}, not to '{kind}'")
    if kind != "open-vocab-od" and "shape" in value:
        raise UserError(f"{origin}: regions.shape (boxes or polygons) applies to open-vocab-od only, not to '{kind}'")
    out.update({k: str(v) for k, v in value.items()})
    if out["box_format"] not in BOX_FORMATS:
        raise UserError(f"{origin}: regions.box_format must be one of {', '.join(BOX_FORMATS)}, "
                        f"got '{out['box_format']}'")
    if out.get("shape", "boxes") not in SHAPES:
        raise UserError(f"{origin}: regions.shape must be one of {', '.join(SHAPES)}, got '{out['shape']}'")
    return out


def with_box_format(spec: Any, box_format: str | None) -> Any:
    """``spec`` reading its boxes in ``box_format`` (the ``--box-format`` flag); unchanged when None."""
    if not box_format:
        return spec
    if not spec.regions:
        raise UserError(f"--box-format applies to region tasks (od, grounding, ...), not to '{spec.name}'")
    if box_format not in BOX_FORMATS:
        raise UserError(f"--box-format must be one of {', '.join(BOX_FORMATS)}, got '{box_format}'")
    return dataclasses.replace(spec, regions={**spec.regions, "box_format": box_format})
