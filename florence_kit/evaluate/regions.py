"""Region answers: generate with the ``<loc_*>`` tokens kept, and parse them into pixel coordinates.

``predict`` on a region task prints the parsed result (JSON, pixel coordinates, as the processor's
``post_process_generation`` returns it); :mod:`florence_kit.present.draw` draws it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from florence_kit.common.geometry import decode_answers, ensure_parse_config, parse_boxes, parse_quads
from florence_kit.tasks.spec import TaskSpec


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
    """One answer decoded WITH its location tokens (see :func:`florence_kit.common.geometry.decode_answers`)."""
    import torch

    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen_config)
    return decode_answers(processor, out)[0]


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
