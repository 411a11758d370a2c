"""``florence_task``: one metric for a dataset whose prompts carry Florence-2 task tokens (Roboflow/maestro JSONL).

Each reference is a JSON string ``{"task": "<OD>", "answer": "..."}`` (written by the ``florence-jsonl``
task's row_map from the row's ``prefix`` and ``suffix``). Samples are grouped by their task token and each
group is scored the way the task calls for:
- region answers (``<OD>``, ``<DENSE_REGION_CAPTION>``, ``<CAPTION_TO_PHRASE_GROUNDING>``,
  ``<OPEN_VOCABULARY_DETECTION>``, ``<REGION_PROPOSAL>``): parsed and scored by class-aware COCO mAP@[.5:.95]
  (the boxes are compared in ``<loc_*>`` units: IoU does not change when both axes are scaled);
- ``<OCR>``: 1 - CER (so that, like the others, higher is better);
- captions (``<CAPTION>``, ``<DETAILED_CAPTION>``, ``<MORE_DETAILED_CAPTION>``): CIDEr;
- anything else (``<DocVQA>``, ``<VQA>``, a token of your own, no token): ANLS.
The set score is the group's score, or with several groups their mean weighted by sample count; the details
give each group's metric and score. To score with one metric of your choice instead, write a four-line task
file: ``prompt: "{prefix}"``, ``target: "{suffix}"``, ``references: suffix``, ``metric: NAME``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from florence_kit.common.geometry import parse_boxes
from florence_kit.metrics import corpus_metric, get_metric

REGION_TOKENS = {"<OD>", "<DENSE_REGION_CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>",
                 "<REGION_PROPOSAL>"}
CAPTION_TOKENS = {"<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"}
TASK_TOKEN = re.compile(r"^\s*(<[A-Za-z_]+>)")
LOC_SIZE = (1000, 1000)  # boxes stay in <loc_*> bins


def task_token(prefix: str) -> str:
    """The task token a prompt starts with (``<DocVQA>`` of ``<DocVQA>what is ...``), or ``""``."""
    match = TASK_TOKEN.match(prefix or "")
    return match.group(1) if match else ""


def metric_for(token: str) -> str:
    """The metric a task token is scored with."""
    if token in REGION_TOKENS:
        return "coco_map"
    if token == "<OCR>":
        return "cer"
    if token in CAPTION_TOKENS:
        return "cider"
    return "anls"


def _region_reference(answer: str) -> str:
    parsed = parse_boxes(answer, LOC_SIZE, ascii_only=False)
    return json.dumps({"size": list(LOC_SIZE), "labels": parsed["labels"], "boxes": parsed["bboxes"]})


@corpus_metric("florence_task")
def florence_task(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Each sample scored by the metric its task token calls for (see the module docstring)."""
    groups: dict[str, list[int]] = {}
    parsed = []
    for k, refs in enumerate(references):
        try:
            ref = json.loads(refs[0])
        except (IndexError, TypeError, json.JSONDecodeError):
            raise ValueError("florence_task needs one JSON reference {'task': ..., 'answer': ...} per sample "
                             "(the florence-jsonl task writes them)") from None
        parsed.append(ref)
        groups.setdefault(metric_for(ref.get("task", "")), []).append(k)
    per_sample = [0.0] * len(predictions)
    details: dict[str, Any] = {}
    total = 0.0
    for name, members in groups.items():
        preds = [predictions[k] for k in members]
        if name == "coco_map":
            refs = [[_region_reference(parsed[k]["answer"])] for k in members]
        else:
            refs = [[parsed[k]["answer"]] for k in members]
        scores, value, _ = get_metric(name).compute_with_details(preds, refs)
        if name == "cer":
            scores, value = [1.0 - s for s in scores], 1.0 - value
        for k, s in zip(members, scores, strict=True):
            per_sample[k] = float(s)
        label = "1-cer" if name == "cer" else name
        details[label] = {"score": round(value, 6), "samples": len(members)}
        total += value * len(members)
    return per_sample, total / len(predictions), details
