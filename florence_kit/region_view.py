"""Seeing region answers: parse a generated ``<loc_*>`` text and draw its boxes/polygons on the image.

``predict`` on a region task prints the parsed result (JSON, pixel coordinates, as the processor's
``post_process_generation`` returns it) and saves the drawing as a PNG next to the input image.
Drawing reuses :func:`florence_kit.serve.draw_regions`, the same code the web page uses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from florence_kit.boxes import decode_answers, ensure_parse_config, parse_boxes, parse_quads
from florence_kit.task import TaskSpec


def task_token(prompt: str) -> str:
    match = re.match(r"<[A-Z_]+>", prompt)
    return match.group(0) if match else ""


def parse_answer(spec: TaskSpec, processor: Any, text: str, size: tuple[int, int]) -> dict[str, Any]:
    """The processor's own parse of ``text`` for the task's token; our matching parser when it has none."""
    token = task_token(spec.prompt)
    if processor is not None and token in getattr(processor, "tasks_answer_post_processing_type", {}):
        ensure_parse_config(processor)
        return processor.post_process_generation(text, task=token, image_size=size)[token]
    kind = (spec.regions or {}).get("kind")
    return parse_quads(text, size, whole_pixels=True) if kind == "ocr-region" else parse_boxes(text, size, True)


def png_path(image_path: Path, spec: TaskSpec) -> Path:
    """``page.png`` + task ``od`` -> ``page.od.png`` beside it (``/`` in task names becomes ``_``)."""
    return image_path.with_name(f"{image_path.stem}.{spec.name.replace('/', '_')}.png")


def generate_raw(model: Any, processor: Any, image: Any, prompt: str, gen_config: Any) -> str:
    """One answer decoded WITH its location tokens (see :func:`florence_kit.boxes.decode_answers`)."""
    import torch

    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen_config)
    return decode_answers(processor, out)[0]


def draw_answer(image: Any, result: dict[str, Any], out: Path) -> Path | None:
    """Save the regions drawn on ``image`` to ``out``; None when the answer holds no region."""
    from florence_kit.serve import draw_regions

    drawing = draw_regions(image, result)
    if drawing is None:
        return None
    drawing.save(out)
    return out


TRUE_COLOUR, PREDICTED_COLOUR = "#2ca02c", "#d62728"


def region_reference(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The region reference (size, labels, boxes or quads) of a predictions.jsonl record; None for other tasks."""
    import json

    refs = rec.get("references") or []
    if not refs or not isinstance(refs[0], str) or not refs[0].startswith("{"):
        return None
    try:
        ref = json.loads(refs[0])
    except ValueError:
        return None
    return ref if isinstance(ref, dict) and "size" in ref and ("boxes" in ref or "quads" in ref) else None


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
