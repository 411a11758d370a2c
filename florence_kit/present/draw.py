"""Drawing regions: boxes, quads and polygons on an image, for predict, serve and the report's thumbnails.

One drawing routine for every place a user sees region answers, so the web page, ``predict``'s PNG and
the report agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from florence_kit.common.geometry import parse_boxes, parse_quads
from florence_kit.evaluate.regions import region_reference

COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def draw_regions(image: Any, result: Any) -> Any | None:
    """Draw Florence-2's post-processed regions on a copy of ``image``; None when ``result`` has none.

    ``result`` is one value of ``processor.post_process_generation(...)``: a dict with ``bboxes``
    ([x1, y1, x2, y2]) and ``labels`` or ``bboxes_labels``; ``quad_boxes`` (8 numbers) and ``labels``;
    or ``polygons`` (per instance, a list of flat [x1, y1, x2, y2, ...] lists) and ``labels`` or
    ``polygons_labels``. Coordinates are pixels of the original image.
    """
    from PIL import ImageDraw

    if not isinstance(result, dict):
        return None
    shapes: list[tuple[str, list[float], str]] = []
    for box, label in zip(result.get("bboxes") or [], _labels(result, "bboxes"), strict=False):
        shapes.append(("box", [float(v) for v in box], label))
    for quad, label in zip(result.get("quad_boxes") or [], _labels(result, "quad_boxes"), strict=False):
        shapes.append(("polygon", [float(v) for v in quad], label))
    for polygons, label in zip(result.get("polygons") or [], _labels(result, "polygons"), strict=False):
        for poly in polygons:
            shapes.append(("polygon", [float(v) for v in poly], label))
    if not shapes:
        return None
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(max(out.size) / 300))
    for index, (kind, coords, label) in enumerate(shapes):
        colour = COLOURS[index % len(COLOURS)]
        if kind == "box":
            x1, y1, x2, y2 = coords
            draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=colour, width=width)
            anchor = (min(x1, x2), min(y1, y2))
        else:
            if len(coords) < 6:
                continue
            draw.polygon(coords, outline=colour, width=width)
            anchor = (coords[0], coords[1])
        if label:
            left, top, right, bottom = draw.textbbox(anchor, label)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
            draw.text(anchor, label, fill="white")
    return out


def _labels(result: dict[str, Any], key: str) -> list[str]:
    n = len(result.get(key) or [])
    labels = result.get(f"{key}_labels", result.get("labels")) if key != "quad_boxes" else result.get("labels")
    labels = [str(x) for x in (labels or [])]
    return (labels + [""] * n)[:n]


def draw_answer(image: Any, result: dict[str, Any], out: Path) -> Path | None:
    """Save the regions drawn on ``image`` to ``out``; None when the answer holds no region."""
    drawing = draw_regions(image, result)
    if drawing is None:
        return None
    drawing.save(out)
    return out


TRUE_COLOUR, PREDICTED_COLOUR = "#2ca02c", "#d62728"


TRUE_COLOUR, PREDICTED_COLOUR = "#2ca02c", "#d62728"


def overlay_thumbnail(jpeg: bytes, rec: dict[str, Any]) -> bytes | None:
    """The thumbnail with true boxes (green) and predicted ones (red, labelled) drawn; None for other tasks."""
    import io

    from PIL import Image, ImageDraw

    ref = region_reference(rec)
    if ref is None:
        return None
    size = tuple(ref["size"])
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    sx, sy = image.width / size[0], image.height / size[1]
    draw = ImageDraw.Draw(image)
    text = str(rec.get("prediction", ""))
    quads = "quads" in ref
    predicted = parse_quads(text, size)["quad_boxes"] if quads else parse_boxes(text, size)["bboxes"]
    labels = parse_quads(text, size)["labels"] if quads else parse_boxes(text, size)["labels"]
    for shapes, colour, names in ((ref.get("quads") or ref.get("boxes") or [], TRUE_COLOUR, None),
                                  (predicted, PREDICTED_COLOUR, labels)):
        for k, coords in enumerate(shapes):
            points = [v * (sx if j % 2 == 0 else sy) for j, v in enumerate(coords)]
            if len(points) == 4:
                draw.rectangle([min(points[0], points[2]), min(points[1], points[3]),
                                max(points[0], points[2]), max(points[1], points[3])], outline=colour, width=2)
            else:
                draw.polygon(points, outline=colour, width=2)
            if names:
                draw.text((points[0] + 2, points[1] + 1), names[k], fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()
