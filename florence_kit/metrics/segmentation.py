"""Metrics for the polygon and proposal tasks: mask mAP, mean IoU of referring segmentation, proposal recall.

A prediction is the generated text; a reference is one JSON string ``{"size": [w, h], "labels": [...],
"polygons": [[flat polygon, ...] per object], "boxes": [...]}`` written by :mod:`florence_kit.data.region_targets`.
Predicted polygons are read as the processor's ``post_process_generation`` reads them for
``<REFERRING_EXPRESSION_SEGMENTATION>`` (:func:`florence_kit.common.geometry.parse_polygons`) and rasterised at the
image's size by pycocotools, like the true ones.

- ``mask_map``: COCO ``segm`` mAP@[.5:.95] (pycocotools' ``COCOeval``, iouType ``segm``) over the whole set, one
  class per phrase: the prompt names the phrase, so every object a prediction draws is of that class. Generated
  polygons carry no confidence: score 1 each, tied scores taken as one operating point as for box mAP
  (:func:`florence_kit.metrics.region_scores.tied_precision`).
- ``mean_iou``: per example, the IoU of the union of the predicted polygons with the union of the true ones (both
  empty: 1); the mean over the set (mIoU, RefCOCO's usual score), with cumulative IoU (sum of intersections over sum
  of unions) and precision at IoU .5 in the details.
- ``proposal_recall``: share of true boxes matched one-to-one by a proposed box at IoU >= .5 (labels are empty).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Sequence
from typing import Any

from florence_kit.common.geometry import parse_polygons, parse_proposals
from florence_kit.metrics import corpus_metric
from florence_kit.metrics.region_scores import _match, tied_precision


def _reference(refs: Sequence[str]) -> dict[str, Any]:
    if not refs:
        raise ValueError("segmentation metrics need one JSON reference per sample")
    ref = json.loads(refs[0]) if isinstance(refs[0], str) else dict(refs[0])
    if "polygons" not in ref:
        raise ValueError("segmentation metrics need references with 'polygons' (a segmentation task's references)")
    ref.setdefault("labels", [""] * len(ref["polygons"]))
    return ref


def _phrase(ref: dict[str, Any]) -> str:
    """The class of every object predicted for this example: the reference's phrase ("" for region-in tasks)."""
    return str(ref.get("phrase", ref["labels"][0] if ref["labels"] else ""))


@functools.lru_cache(maxsize=4)
def _masks(predictions: tuple[str, ...], references: tuple[tuple[str, ...], ...]) -> tuple[list, list, list]:
    """Per example: the reference, true RLEs (one per object), predicted RLEs (one per object)."""
    from florence_kit.common.masks import polygons_to_rle  # numpy + pycocotools: only when scoring

    refs = [_reference(r) for r in references]
    truth, found = [], []
    for text, ref in zip(predictions, refs, strict=True):
        size = tuple(ref["size"])
        truth.append([polygons_to_rle(obj, size) for obj in ref["polygons"]])
        found.append([polygons_to_rle(obj, size) for obj in parse_polygons(text, size)["polygons"]])
    return refs, truth, found


def _as_tuples(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[tuple, tuple]:
    return tuple(str(p) for p in predictions), tuple(tuple(r) for r in references)


@corpus_metric("mask_map")
def mask_map(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """COCO segm mAP@[.5:.95] over the whole set, one class per phrase (per-sample: the example's IoU)."""
    import numpy as np

    from florence_kit.common.masks import coco_mask

    refs, truth, found = _masks(*_as_tuples(predictions, references))
    mask_utils = coco_mask()
    names = sorted({_phrase(ref) for ref in refs})
    index = {name: k + 1 for k, name in enumerate(names)}
    images, anns, dets = [], [], []
    for i, (ref, true, pred) in enumerate(zip(refs, truth, found, strict=True)):
        images.append({"id": i, "width": ref["size"][0], "height": ref["size"][1]})
        cls = index[_phrase(ref)]
        for rle in true:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cls, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "iscrowd": 0,
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)]})
        for rle in pred:
            dets.append({"image_id": i, "category_id": cls, "segmentation": rle, "score": 1.0})
    per_sample = [_union_iou(t, p)[0] for t, p in zip(truth, found, strict=True)]
    if not anns or not dets:
        return per_sample, 0.0, {"map": 0.0, "map_50": 0.0, "map_75": 0.0, "phrases": len(names)}
    with contextlib.redirect_stdout(io.StringIO()):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k, "name": n} for n, k in index.items()]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(dets), "segm")
        evaluator.evaluate()
    precision = tied_precision(evaluator)

    def mean(p: Any) -> float:
        return max(float(np.mean(p[p > -1])), 0.0) if (p > -1).any() else 0.0

    details = {"map": mean(precision), "map_50": mean(precision[0]), "map_75": mean(precision[5]),
               "phrases": len(names), "predicted_objects": len(dets), "true_objects": len(anns)}
    return per_sample, details["map"], details


def _union_iou(true: list, pred: list) -> tuple[float, int, int]:
    """(IoU, intersection, union) in pixels of the union of the true and of the predicted masks."""
    from florence_kit.common.masks import coco_mask

    mask_utils = coco_mask()
    if not true and not pred:
        return 1.0, 0, 0
    if not true or not pred:
        return 0.0, 0, int(sum(mask_utils.area(r) for r in true + pred))
    t = mask_utils.merge(true) if len(true) > 1 else true[0]
    p = mask_utils.merge(pred) if len(pred) > 1 else pred[0]
    inter = int(mask_utils.area(mask_utils.merge([t, p], intersect=True)))
    union = int(mask_utils.area(mask_utils.merge([t, p])))
    return (inter / union if union else 1.0), inter, union


@corpus_metric("mean_iou")
def mean_iou(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Mean over examples of the IoU of the predicted with the true masks (mIoU); cIoU and P@.5 in the details."""
    _, truth, found = _masks(*_as_tuples(predictions, references))
    per_sample, inter_all, union_all = [], 0, 0
    for true, pred in zip(truth, found, strict=True):
        value, inter, union = _union_iou(true, pred)
        per_sample.append(value)
        inter_all, union_all = inter_all + inter, union_all + union
    details = {"miou": sum(per_sample) / len(per_sample), "ciou": inter_all / union_all if union_all else 1.0,
               "precision_50": sum(v >= 0.5 for v in per_sample) / len(per_sample)}
    return per_sample, details["miou"], details


@corpus_metric("proposal_recall")
def proposal_recall(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Share of true boxes matched one-to-one by a proposed box at IoU >= .5 (per-sample: that image's share)."""
    per_sample, hits_all, total = [], 0, 0
    for text, refs in zip(predictions, references, strict=True):
        ref = json.loads(refs[0]) if isinstance(refs[0], str) else refs[0]
        boxes = parse_proposals(text, tuple(ref["size"]))["bboxes"]
        hits = _match(boxes, ref["boxes"])
        per_sample.append(hits / len(ref["boxes"]) if ref["boxes"] else float(not boxes))
        hits_all, total = hits_all + hits, total + len(ref["boxes"])
    return per_sample, hits_all / total if total else 1.0
