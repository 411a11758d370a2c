"""Drawing regions: boxes, quads and polygons on an image, for predict, serve and the report's thumbnails.

One drawing routine for every place a user sees region answers, so the web page, ``predict``'s PNG and
the report agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from florence_kit.common.geometry import parse_boxes, parse_polygons, parse_quads, prompt_box
from florence_kit.evaluate.region_answers import region_reference

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
    filled = [(coords, COLOURS[k % len(COLOURS)]) for k, (kind, coords, _) in enumerate(shapes)
              if kind == "polygon" and len(coords) >= 6 and result.get("polygons")]  # masks: filled, then outlined
    out = fill_polygons(image.convert("RGB"), [c for c, _ in filled], [colour for _, colour in filled])
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


TRUE_COLOUR, PREDICTED_COLOUR, BOX_COLOUR = "#2ca02c", "#d62728", "#1f77b4"
FILL_ALPHA = 90  # of 255: the picture stays readable under a filled polygon


def fill_polygons(image: Any, polygons: list[list[float]], colours: list[str]) -> Any:
    """A copy of ``image`` with each polygon filled translucently in its colour (outlines are the caller's)."""
    from PIL import Image, ImageColor, ImageDraw

    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for coords, colour in zip(polygons, colours, strict=True):
        if len(coords) >= 6:
            draw.polygon([float(v) for v in coords], fill=(*ImageColor.getrgb(colour), FILL_ALPHA))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _polygon_panel(image: Any, objects: list[list[list[float]]], colour: str, scale: tuple[float, float]) -> Any:
    from PIL import ImageDraw

    polys = [[v * scale[j % 2] for j, v in enumerate(p)] for obj in objects for p in obj if len(p) >= 6]
    panel = fill_polygons(image, polys, [colour] * len(polys))
    draw = ImageDraw.Draw(panel)
    for p in polys:
        draw.polygon(p, outline=colour, width=2)
    return panel


def polygon_thumbnail(image: Any, ref: dict[str, Any], text: str) -> Any:
    """True polygons (green, left) beside the predicted ones (red, right), filled and outlined: overlapping
    translucent masks on one picture would hide which is which."""
    from PIL import Image, ImageDraw

    size = tuple(ref["size"])
    scale = (image.width / size[0], image.height / size[1])
    predicted = parse_polygons(text, size)["polygons"]
    if not predicted and "<poly>" in text:  # open-vocab-od with polygons: a label before them
        predicted = parse_polygons(text, size, labelled=True)["polygons"]
    out = Image.new("RGB", (image.width * 2 + 4, image.height), "white")
    out.paste(_polygon_panel(image, ref["polygons"], TRUE_COLOUR, scale), (0, 0))
    out.paste(_polygon_panel(image, predicted, PREDICTED_COLOUR, scale), (image.width + 4, 0))
    draw = ImageDraw.Draw(out)
    draw.text((3, 2), "true", fill=TRUE_COLOUR)
    draw.text((image.width + 7, 2), "predicted", fill=PREDICTED_COLOUR)
    return out


def prompt_box_thumbnail(image: Any, prompt: str) -> Any | None:
    """A region-in example's input box (the prompt's ``<loc_*>`` bins: thousandths of the image) in blue."""
    from PIL import ImageDraw

    bins = prompt_box(prompt)
    if bins is None:
        return None
    x1, y1, x2, y2 = ((b + 0.5) / 1000 * (image.width if k % 2 == 0 else image.height) for k, b in enumerate(bins))
    out = image.copy()
    ImageDraw.Draw(out).rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=BOX_COLOUR, width=2)
    return out


def overlay_thumbnail(jpeg: bytes, rec: dict[str, Any]) -> bytes | None:
    """The thumbnail with true boxes (green) and predicted ones (red, labelled) drawn; polygons true | predicted side
    by side; a region-in task's input box (blue); None for other tasks."""
    import io

    from PIL import Image, ImageDraw

    ref = region_reference(rec)
    if ref is None or "polygons" in ref:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        drawn = (polygon_thumbnail(image, ref, str(rec.get("prediction", ""))) if ref is not None
                 else prompt_box_thumbnail(image, str(rec.get("prompt", ""))))
        if drawn is None:
            return None
        buf = io.BytesIO()
        drawn.save(buf, format="JPEG", quality=85)
        return buf.getvalue()
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
