"""Metrics for region tasks: class-aware COCO mAP, grounding recall, region recall, OCR-with-regions CER/WER.

A prediction is the generated text with its ``<loc_*>`` tokens; a reference is one JSON string
``{"size": [w, h], "labels": [...], "boxes": [[x1, y1, x2, y2], ...]}`` (``quads`` for OCR) in pixels,
written by :mod:`florence_kit.data.region_targets`. Predictions are parsed as the processor's
``post_process_generation`` parses them (:mod:`florence_kit.common.geometry`) against the reference's image size,
so ``predictions.jsonl`` can be re-scored without a model, except that labels keep their non-ASCII
characters (the processor drops them, which would make "café" or "信号灯" an unknown class).

mAP is computed ONCE over the whole evaluation set, per class, by pycocotools' ``COCOeval`` (the reference
implementation; torchmetrics' wrapper needs torchvision, which would pull another torch build):
mAP@[.5:.95] is the task score, mAP@.5, mAP@.75 and per-class AP are its details. At most 100
boxes per image count, as in COCO.
Generated boxes carry no confidence, so each gets score 1: within an image they are matched in generation
order (COCO's stable sort), and across the set all of them form ONE operating point of the precision-recall
curve (tied scores are one threshold, as in scikit-learn). pycocotools' own ``accumulate`` would walk the tied
detections in image order, which makes the score depend on the order of the evaluation set (the same
answers, reversed, could move a class's AP from 0.5 to 1); with distinct scores the two agree exactly.
A generated class name that is not in the label set (every name in the references) cannot match any
true box: it is counted and listed in the details, never silently dropped.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import Levenshtein

from florence_kit.common.geometry import iou, parse_boxes, parse_quads, quad_to_box
from florence_kit.metrics import corpus_metric


def _reference(refs: Sequence[str]) -> dict[str, Any]:
    if not refs:
        raise ValueError("region metrics need one JSON reference per sample")
    ref = json.loads(refs[0]) if isinstance(refs[0], str) else refs[0]
    ref.setdefault("labels", [])
    ref.setdefault("boxes", [quad_to_box(q) for q in ref.get("quads", [])])
    return ref


def _match(pred_boxes: list[list[float]], true_boxes: list[list[float]], threshold: float = 0.5,
           pred_labels: list[str] | None = None, true_labels: list[str] | None = None) -> int:
    """Greedy one-to-one matches at IoU >= threshold (same label when labels are given)."""
    used: set[int] = set()
    hits = 0
    for k, box in enumerate(pred_boxes):
        best, best_iou = None, threshold
        for j, true in enumerate(true_boxes):
            if j in used or (pred_labels is not None and pred_labels[k] != true_labels[j]):  # type: ignore[index]
                continue
            value = iou(box, true)
            if value >= best_iou:
                best, best_iou = j, value
        if best is not None:
            used.add(best)
            hits += 1
    return hits


def _f1(hits: int, n_pred: int, n_true: int) -> float:
    if n_pred == 0 and n_true == 0:
        return 1.0
    return 2 * hits / (n_pred + n_true)


def _coco_eval(sizes: list[list[int]], truth: list[tuple[list, list[int]]], found: list[tuple[list, list[int]]],
               n_classes: int) -> tuple[list[float], list[float]]:
    """pycocotools' COCOeval over the whole set: ([mAP, mAP@.5, mAP@.75], AP per class id, -1 = no true box)."""
    import contextlib
    import io

    import numpy as np
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("mAP needs pycocotools: pip install 'florence-kit[detection]'") from None

    def xywh(b: list[float]) -> list[float]:
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    images = [{"id": i, "width": w, "height": h} for i, (w, h) in enumerate(sizes)]
    anns, dets = [], []
    for i, (boxes, classes) in enumerate(truth):
        for b, c in zip(boxes, classes, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c + 1, "bbox": xywh(b),
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0})
    for i, (boxes, classes) in enumerate(found):
        for b, c in zip(boxes, classes, strict=True):
            dets.append({"image_id": i, "category_id": c + 1, "bbox": xywh(b), "score": 1.0})
    if not anns:
        return [0.0, 0.0, 0.0], [-1.0] * n_classes
    if not dets:
        return [0.0, 0.0, 0.0], [0.0] * n_classes
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary table
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(n_classes)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
        evaluator.evaluate()
    precision = tied_precision(evaluator)  # [iou thresholds, recall points, classes]

    def mean(p: Any) -> float:
        return float(np.mean(p[p > -1])) if (p > -1).any() else -1.0

    stats = [mean(precision), mean(precision[0]), mean(precision[5])]  # IoU .5:.95, .5 (index 0), .75 (index 5)
    return [max(v, 0.0) for v in stats], [mean(precision[:, :, k]) for k in range(n_classes)]


def tied_precision(evaluator: Any) -> Any:
    """COCO's interpolated precision (area "all", 100 detections, 101 recall points) with tied scores as one threshold.

    Returns the interpolated precision ``[iou thresholds, recall points, classes]`` (-1: class without true
    boxes). The curve gets a point only where the score changes, so the order of images no longer matters.
    """
    import numpy as np

    params = evaluator.params
    n_images, n_areas = len(params.imgIds), len(params.areaRng)
    precision = -np.ones((len(params.iouThrs), len(params.recThrs), len(params.catIds)))
    for k in range(len(params.catIds)):
        evals = [e for e in evaluator.evalImgs[k * n_areas * n_images: k * n_areas * n_images + n_images] if e]
        npig = sum(int(np.count_nonzero(e["gtIgnore"] == 0)) for e in evals)
        if not evals or npig == 0:
            continue
        scores = np.concatenate([e["dtScores"] for e in evals])
        order = np.argsort(-scores, kind="mergesort")
        matched = np.concatenate([e["dtMatches"] for e in evals], axis=1)[:, order] > 0
        ignored = np.concatenate([e["dtIgnore"] for e in evals], axis=1)[:, order] > 0
        last_of_tie = np.r_[scores[order][1:] != scores[order][:-1], True] if len(order) else np.zeros(0, bool)
        tp = np.cumsum(matched & ~ignored, axis=1)[:, last_of_tie].astype(float)
        fp = np.cumsum(~matched & ~ignored, axis=1)[:, last_of_tie].astype(float)
        for t in range(len(params.iouThrs)):
            recall, prec = tp[t] / npig, tp[t] / (tp[t] + fp[t] + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1]  # interpolated: best precision at this recall or more
            at = np.searchsorted(recall, params.recThrs, side="left")
            precision[t, :, k] = np.where(at < len(prec), prec[np.minimum(at, len(prec) - 1)] if len(prec) else 0, 0)
    return precision


@functools.lru_cache(maxsize=4)
def _coco(predictions: tuple[str, ...], references: tuple[tuple[str, ...], ...]) -> tuple[list[float], dict]:
    refs = [_reference(r) for r in references]
    names = sorted({label for ref in refs for label in ref["labels"]})
    index = {name: k for k, name in enumerate(names)}
    unknown: dict[str, int] = {}
    found, truth, per_sample = [], [], []
    for text, ref in zip(predictions, refs, strict=True):
        parsed = parse_boxes(text, tuple(ref["size"]), ascii_only=False)
        known = [(b, lab) for b, lab in zip(parsed["bboxes"], parsed["labels"], strict=True) if lab in index]
        for lab in parsed["labels"]:
            if lab not in index:
                unknown[lab] = unknown.get(lab, 0) + 1
        hits = _match(parsed["bboxes"], ref["boxes"], 0.5, parsed["labels"], ref["labels"])
        per_sample.append(_f1(hits, len(parsed["bboxes"]), len(ref["boxes"])))
        found.append(([b for b, _ in known], [index[lab] for _, lab in known]))
        truth.append((ref["boxes"], [index[lab] for lab in ref["labels"]]))
    stats, per_class = _coco_eval([ref["size"] for ref in refs], truth, found, len(names))
    details = {
        "map": stats[0], "map_50": stats[1], "map_75": stats[2],
        "ap_per_class": {names[k]: round(ap, 6) for k, ap in enumerate(per_class) if ap >= 0},
        "labels": len(names),
        "unknown_labels": sum(unknown.values()),
        "unknown_label_names": dict(sorted(unknown.items(), key=lambda kv: -kv[1])[:20]),
    }
    return per_sample, details


def _as_tuples(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[tuple, tuple]:
    return tuple(str(p) for p in predictions), tuple(tuple(r) for r in references)


@corpus_metric("coco_map")
def coco_map(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """mAP@[.5:.95] over the whole set, per class (per-sample: class-aware F1 at IoU .5)."""
    per_sample, details = _coco(*_as_tuples(predictions, references))
    return per_sample, details["map"], details


@corpus_metric("map_50")
def map_50(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """mAP at IoU .5 over the whole set, per class."""
    per_sample, details = _coco(*_as_tuples(predictions, references))
    return per_sample, details["map_50"]


@corpus_metric("grounding_recall")
def grounding_recall(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Share of phrases whose first predicted box (same phrase) has IoU >= .5 with one of its true boxes."""
    per_sample, correct, total = [], 0, 0
    for text, refs in zip(predictions, references, strict=True):
        ref = _reference(refs)
        parsed = parse_boxes(text, tuple(ref["size"]), ascii_only=False)
        first: dict[str, list[float]] = {}
        for box, label in zip(parsed["bboxes"], parsed["labels"], strict=True):
            first.setdefault(label.lower(), box)
        phrases = list(dict.fromkeys(label.lower() for label in ref["labels"]))
        hits = sum(
            1 for phrase in phrases if phrase in first and any(
                iou(first[phrase], box) >= 0.5
                for box, label in zip(ref["boxes"], ref["labels"], strict=True) if label.lower() == phrase)
        )
        per_sample.append(hits / len(phrases) if phrases else 1.0)
        correct, total = correct + hits, total + len(phrases)
    return per_sample, correct / total if total else 1.0


@corpus_metric("region_recall")
def region_recall(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Share of true regions matched one-to-one by a predicted box at IoU >= .5 (labels not compared)."""
    per_sample, hits_all, total = [], 0, 0
    for text, refs in zip(predictions, references, strict=True):
        ref = _reference(refs)
        boxes = parse_boxes(text, tuple(ref["size"]), ascii_only=False)["bboxes"]
        hits = _match(boxes, ref["boxes"])
        per_sample.append(hits / len(ref["boxes"]) if ref["boxes"] else float(not boxes))
        hits_all, total = hits_all + hits, total + len(ref["boxes"])
    return per_sample, hits_all / total if total else 1.0


def _ocr_rate(split):
    def compute(predictions: Sequence[str], references: Sequence[Sequence[str]]):
        per_sample, edits, length = [], 0, 0
        for text, refs in zip(predictions, references, strict=True):
            ref = _reference(refs)
            hyp = split(" ".join(parse_quads(text, tuple(ref["size"]))["labels"]))
            truth = split(" ".join(ref["labels"]))
            distance = Levenshtein.distance(hyp, truth)
            per_sample.append(distance / max(len(truth), 1))
            edits, length = edits + distance, length + len(truth)
        return per_sample, edits / max(length, 1)

    return compute


ocr_region_cer = corpus_metric("ocr_region_cer", higher_is_better=False)(_ocr_rate(lambda t: t))
ocr_region_wer = corpus_metric("ocr_region_wer", higher_is_better=False)(_ocr_rate(lambda t: t.split()))


@corpus_metric("ocr_box_recall")
def ocr_box_recall(predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Share of true text regions matched one-to-one by a predicted quadrilateral (bounding boxes, IoU >= .5)."""
    per_sample, hits_all, total = [], 0, 0
    for text, refs in zip(predictions, references, strict=True):
        ref = _reference(refs)
        boxes = [quad_to_box(q) for q in parse_quads(text, tuple(ref["size"]))["quad_boxes"]]
        hits = _match(boxes, ref["boxes"])
        per_sample.append(hits / len(ref["boxes"]) if ref["boxes"] else float(not boxes))
        hits_all, total = hits_all + hits, total + len(ref["boxes"])
    return per_sample, hits_all / total if total else 1.0
