"""The ``regions:`` block of a task file (od, grounding, region-caption, ocr-region) and ``--box-format``.

Checked when task files are read, so it sits with the task spec; :mod:`florence_kit.data.regions`
turns the rows of such a task into ``<loc_*>`` targets.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from florence_kit.common.errors import UserError

KINDS = ("od", "grounding", "region-caption", "ocr-region")
BOX_FORMATS = ("xywh", "xyxy", "xywhn", "xyxyn", "cxcywhn", "quad", "quadn")
REGION_KEYS = {"kind", "box_format", "objects", "bbox", "category", "caption"}


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
    """The task file's ``regions:`` mapping with defaults filled in; every problem names the field."""
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
    ocr = kind == "ocr-region"
    out = {"kind": kind, "box_format": "quad" if ocr else "xywh", "objects": "objects",
           "bbox": "quad" if ocr else "bbox", "category": "text" if ocr else "category", "caption": "caption"}
    out.update({k: str(v) for k, v in value.items()})
    if out["box_format"] not in BOX_FORMATS:
        raise UserError(f"{origin}: regions.box_format must be one of {', '.join(BOX_FORMATS)}, "
                        f"got '{out['box_format']}'")
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
