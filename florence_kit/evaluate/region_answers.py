"""Region answers: generate with the ``<loc_*>`` tokens kept, and parse them into pixel coordinates.

``predict`` on a region task prints the parsed result (JSON, pixel coordinates, as the processor's
``post_process_generation`` returns it); :mod:`florence_kit.present.draw` draws it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.common.geometry import (
    box_prompt,
    ensure_parse_config,
    parse_boxes,
    parse_polygons,
    parse_proposals,
    parse_quads,
)
from florence_kit.tasks.spec import TaskSpec, template_fields

TEXT_KINDS = ("region-category", "region-description", "region-ocr")  # a box in, text out


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
    if kind == "ocr-region":
        return parse_quads(text, size, whole_pixels=True)
    if kind in ("segmentation", "region-segmentation"):
        return parse_polygons(text, size, whole_pixels=True)
    if kind == "region-proposal":
        return parse_proposals(text, size, whole_pixels=True)
    if kind in TEXT_KINDS:
        return text  # type: ignore[return-value]
    if kind == "open-vocab-od" and "<poly>" in text:
        return {"polygons": (found := parse_polygons(text, size, True, labelled=True))["polygons"],
                "polygons_labels": found["labels"]}
    return parse_boxes(text, size, True)


def png_path(image_path: Path, spec: TaskSpec) -> Path:
    """``page.png`` + task ``od`` -> ``page.od.png`` beside it (``/`` in task names becomes ``_``)."""
    return image_path.with_name(f"{image_path.stem}.{spec.name.replace('/', '_')}.png")


def generate_raw(model: Any, processor: Any, image: Any, prompt: str, gen_config: Any) -> str:
    """One answer decoded WITH its location tokens (see :func:`florence_kit.common.geometry.decode_answers`)."""
    from florence_kit.evaluate.generation import generate

    return generate(model, processor, [image], [prompt], gen_config)[0]


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
    return ref if isinstance(ref, dict) and "size" in ref and ({"boxes", "quads", "polygons"} & set(ref)) else None


def parse_box_text(text: str, size: tuple[int, int], flag: str = "--box") -> list[float]:
    """``"x1,y1,x2,y2"`` in pixels of the image -> a box, or one line naming the problem."""
    try:
        box = [float(v) for v in str(text).replace(" ", ",").split(",") if v != ""]
    except ValueError:
        box = []
    if len(box) != 4:
        raise UserError(f"{flag} must be four numbers x1,y1,x2,y2 in pixels of the image, got '{text}'")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise UserError(f"{flag} '{text}' has no area: x1,y1,x2,y2 needs x2 > x1 and y2 > y1")
    width, height = size
    if box[0] >= width or box[1] >= height or box[2] <= 0 or box[3] <= 0:
        raise UserError(f"{flag} '{text}' lies outside the {width}x{height} image")
    return box


def render_prompt(spec: TaskSpec, question: str | None, box: str | None, size: tuple[int, int],
                  question_flag: str = "--question", box_flag: str = "--box") -> str:
    """The task's prompt for one image: ``{region}`` is the box (``<loc_*>`` tokens), any other field the question."""
    values = {}
    for name in template_fields(spec.prompt):
        if name == "region":
            if not box:
                raise UserError(f"task '{spec.name}' needs {box_flag} x1,y1,x2,y2 (pixels of the image; its prompt "
                                f"is {spec.prompt!r})")
            values[name] = box_prompt(parse_box_text(box, size, box_flag), size)
        elif question is None:
            raise UserError(f"task '{spec.name}' needs {question_flag} (its prompt is {spec.prompt!r})")
        else:
            values[name] = question
    return spec.prompt.format(**values)
