"""Florence-2's ``<loc_*>`` form: the quantiser that writes targets and a parser that reads answers.

Florence-2 writes a region as a label followed by ``<loc_x1><loc_y1><loc_x2><loc_y2>`` (quadrilaterals:
eight tokens; polygons: ``<loc_x><loc_y>`` pairs, see :func:`encode_polygons`), coordinates in 1000 bins of the
image's width and height. The native post-processor
(``Florence2PostProcessor`` in transformers) *dequantises* bin ``q`` to its centre ``(q + 0.5) * size / 1000``
and then casts to whole pixels (``.int()``, truncation); its ``quantize`` is ``floor(x / (size / 1000))``
clamped to ``[0, 999]``. We quantise exactly so: a target encoded here and parsed back gives every
coordinate within half a bin at the bin centre (a box touching the right/bottom border lands in bin 999,
whose centre is half a bin inside), and ``post_process_generation`` returns that centre truncated to a
whole pixel (so within half a bin plus one pixel). Our parser returns the centres unrounded by default
(metrics score those: on a 128 px image the native pixel truncation alone would cost a small box IoU
0.9 and turn a perfect answer into a miss at IoU .95); ``whole_pixels=True`` reproduces the processor.

Object order in a target: as the annotation lists them, after a stable sort top-left to bottom-right
(by ``y1``, then ``x1``), so the same image always gives the same target whatever the source's order.

The parser here mirrors the native one's regular expressions (a label is any run of characters
without ``<``: digits, hyphens and spaces are kept, "traffic-light" and "class 2" survive) so metrics
can re-score a ``predictions.jsonl`` without loading a processor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

BINS = 1000
_STRIP = ("<s>", "</s>", "<pad>")
_PHRASE = re.compile(r"([^<]+(?:<loc_\d+>){4,})")
_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_)")
_BOX = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
_QUAD = re.compile(r"(.+?)" + r"<loc_(\d+)>" * 8)


def quantize(value: float, size: float) -> int:
    """Pixel coordinate -> bin, as ``Florence2PostProcessor.quantize``: floor, clamped to [0, 999]."""
    return int(min(max(math.floor(value / (size / BINS)), 0), BINS - 1))


def dequantize(bin_: int, size: float) -> float:
    """Bin -> pixel coordinate at the bin's centre, as ``Florence2PostProcessor.dequantize``."""
    return (bin_ + 0.5) * size / BINS


def loc_tokens(coords: Sequence[float], size: tuple[int, int]) -> str:
    """``[x1, y1, x2, y2, ...]`` in pixels -> ``<loc_..>`` tokens (x against width, y against height)."""
    width, height = size
    return "".join(f"<loc_{quantize(v, width if k % 2 == 0 else height)}>" for k, v in enumerate(coords))


def reading_order(boxes: Sequence[Sequence[float]]) -> list[int]:
    """Indices top-left to bottom-right: by top edge, then left edge; ties keep the given order."""
    return sorted(range(len(boxes)), key=lambda i: (min(boxes[i][1::2]), min(boxes[i][0::2])))


def encode_regions(labels: Sequence[str], boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> str:
    """A target: ``label<loc_x1><loc_y1><loc_x2><loc_y2>`` per object (or 8 tokens per quadrilateral)."""
    return "".join(f"{labels[i]}{loc_tokens(boxes[i], size)}" for i in reading_order(boxes))


def _clean(text: str) -> str:
    for token in _STRIP:
        text = text.replace(token, "")
    return text


def parse_boxes(text: str, size: tuple[int, int], whole_pixels: bool = False,
                ascii_only: bool = True) -> dict[str, list[Any]]:
    """``{"bboxes": [[x1, y1, x2, y2], ...], "labels": [...]}`` as ``post_process_generation`` gives for ``<OD>``,
    ``<DENSE_REGION_CAPTION>`` and ``<CAPTION_TO_PHRASE_GROUNDING>``: one label may carry several boxes.

    The processor drops every non-ASCII character of a label (``ascii_only``); metrics keep them, or a
    perfect "café" (the reference's name) would be read as "caf", an unknown class."""
    width, height = size
    bboxes, labels = [], []
    for phrase in _PHRASE.findall(_clean(text)):
        phrase = phrase.replace("<ground>", "", 1).replace("<obj>", "", 1)
        match = _LABEL.search(phrase)
        if not match:
            continue
        label = match.group().strip()
        label = label.encode("ascii", "ignore").decode("ascii") if ascii_only else label
        for m in _BOX.finditer(phrase):
            q = [int(m.group(j)) for j in range(1, 5)]
            box = [dequantize(q[0], width), dequantize(q[1], height), dequantize(q[2], width), dequantize(q[3], height)]
            bboxes.append([int(v) for v in box] if whole_pixels else box)
            labels.append(label)
    return {"bboxes": bboxes, "labels": labels}


def parse_quads(text: str, size: tuple[int, int], whole_pixels: bool = False) -> dict[str, list[Any]]:
    """``{"quad_boxes": [[x1, y1, ..., x4, y4], ...], "labels": [text, ...]}`` as for ``<OCR_WITH_REGION>``."""
    width, height = size
    quads, labels = [], []
    for content, *bins in _QUAD.findall(_clean(text)):
        quad = [dequantize(int(b), width if k % 2 == 0 else height) for k, b in enumerate(bins)]
        quads.append([int(v) for v in quad] if whole_pixels else quad)
        labels.append(content.strip())
    return {"quad_boxes": quads, "labels": labels}


def quad_to_box(quad: Sequence[float]) -> list[float]:
    """The axis-aligned box around a quadrilateral (or any flat polygon)."""
    xs, ys = quad[0::2], quad[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``xyxy`` boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ensure_parse_config(processor: Any) -> None:
    """Let ``post_process_generation`` parse every region type on checkpoints saved without a
    post-processing config (our tiny ones, older conversions): the parsers' own defaults are what hub
    checkpoints use, but an absent entry makes the processor refuse the parse type."""
    parse_config = getattr(getattr(processor, "post_processor", None), "parse_task_config", None)
    if isinstance(parse_config, dict):
        for kind in {*getattr(processor, "tasks_answer_post_processing_type", {}).values(), "pure_text"}:
            parse_config.setdefault(kind, {})


_LOC_TOKEN = re.compile(r"<loc_\d+>")
_KEPT = {"<sep>", "<poly>", "</poly>"}  # polygon grammar (see below): special in Microsoft's tokenizer too


def decode_answers(processor: Any, sequences: Any) -> list[str]:
    """Generated ids -> answer texts with every special token removed EXCEPT ``<loc_*>``.

    Microsoft's Florence-2 tokenizers list the 1000 location tokens (and the polygon separators ``<sep>``, ``<poly>``,
    ``</poly>``) among the special tokens, so
    ``batch_decode(..., skip_special_tokens=True)`` would erase every box of a region answer; other
    tokenizers (ours, some conversions) do not. Decoding with the specials and removing all but the
    location tokens gives the same text either way, and the same text as before for answers without boxes.
    """
    tok = processor.tokenizer
    specials = sorted((t for t in tok.all_special_tokens if not _LOC_TOKEN.fullmatch(t) and t not in _KEPT),
                      key=len, reverse=True)
    out = []
    for text in processor.batch_decode(sequences, skip_special_tokens=False):
        for token in specials:
            text = text.replace(token, "")
        out.append(text.strip())
    return out


# ---------------------------------------------------------------------------------------------
# Polygons (segmentation) and boxes written into prompts (region-in tasks)
#
# The grammar is the native post-processor's (``parse_description_with_polygons_from_text_and_spans``): a polygon
# is a run of ``<loc_x><loc_y>`` pairs; the polygons of ONE object are joined by ``<sep>``; an answer with several
# objects wraps each in ``<poly>`` ... ``</poly>``. ``<REFERRING_EXPRESSION_SEGMENTATION>`` and
# ``<REGION_TO_SEGMENTATION>`` (parse type ``polygons``) carry no label: one object is written bare,
# ``<loc..><loc..>...<sep><loc..>...``, several as ``<poly>...</poly><poly>...</poly>``. ``<OPEN_VOCABULARY_DETECTION>``
# reads polygons only when the text holds ``<poly>``, after a label: ``phrase<poly>...</poly>``.
# Vertices are quantised like box corners (within half a bin at the bin centre); consecutive vertices in the same
# bin are written once, as is a last vertex equal to the first. Point order inside a polygon is the source's; an
# object's polygons go largest first; objects top-left to bottom-right by their boxes, as box targets are ordered.

SEP, POLY_START, POLY_END = "<sep>", "<poly>", "</poly>"
_POLY_TOKENS = rf"<loc_\d+>|{re.escape(SEP)}|{re.escape(POLY_START)}|{re.escape(POLY_END)}"
_POLY_RUN = re.compile(rf"(?:(?:{_POLY_TOKENS}){{4,}})")
_POLY_RUN_LABELLED = re.compile(rf"([^<]+(?:{_POLY_TOKENS}){{4,}})")
_POLY_LABEL = re.compile(r"^\s*(.*?)(?=<od>|</od>|<box>|</box>|<bbox>|</bbox>|<loc_|<poly>)")
_POLY_INSTANCE = re.compile(rf"{re.escape(POLY_START)}(.*?){re.escape(POLY_END)}")
_POLYGON = re.compile(rf"((?:<loc_\d+>)+)(?:{re.escape(SEP)}|$)")
_LOC_BIN = re.compile(r"<loc_(\d+)>")
_BOX_RUN = re.compile(r"(?:(?:<loc_\d+>){4,})")


def polygon_bins(polygon: Sequence[float], size: tuple[int, int]) -> list[tuple[int, int]]:
    """A flat ``[x1, y1, x2, y2, ...]`` pixel polygon -> its vertices' bins; repeats in a row written once."""
    width, height = size
    out: list[tuple[int, int]] = []
    for k in range(0, len(polygon) - 1, 2):
        point = (quantize(polygon[k], width), quantize(polygon[k + 1], height))
        if not out or point != out[-1]:
            out.append(point)
    if len(out) > 1 and out[-1] == out[0]:
        out.pop()
    return out


def polygon_area(polygon: Sequence[float]) -> float:
    """Signed shoelace area of a flat polygon (positive when clockwise on screen, y pointing down)."""
    xs, ys = polygon[0::2], polygon[1::2]
    n = len(xs)
    return 0.5 * sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))


def polygons_box(polygons: Sequence[Sequence[float]]) -> list[float]:
    """The ``xyxy`` box around one object's polygons."""
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    return [min(xs), min(ys), max(xs), max(ys)]


def object_tokens(polygons: Sequence[Sequence[float]], size: tuple[int, int]) -> str:
    """One object: its polygons, largest first, joined by ``<sep>``; one left with under 3 distinct bins is skipped."""
    runs = []
    for polygon in sorted(polygons, key=lambda p: -abs(polygon_area(p))):
        bins = polygon_bins(polygon, size)
        if len(bins) >= 3:
            runs.append("".join(f"<loc_{x}><loc_{y}>" for x, y in bins))
    return SEP.join(runs)


def encode_polygons(objects: Sequence[Sequence[Sequence[float]]], size: tuple[int, int], label: str = "") -> str:
    """A segmentation target from objects (each a list of flat pixel polygons): one object bare, several each in
    ``<poly>...</poly>``; with ``label`` (open-vocabulary detection) the label first and every object wrapped."""
    kept = [(object_tokens(o, size), polygons_box(o)) for o in objects if o]
    kept = [k for k in kept if k[0]]
    parts = [kept[i][0] for i in reading_order([box for _, box in kept])]
    if not parts:
        return ""
    if len(parts) == 1 and not label:
        return parts[0]
    return label + "".join(f"{POLY_START}{p}{POLY_END}" for p in parts)


def box_prompt(box: Sequence[float], size: tuple[int, int]) -> str:
    """A box as a region-in prompt writes it (``<REGION_TO_CATEGORY><loc_x1><loc_y1><loc_x2><loc_y2>``), pixels xyxy."""
    return loc_tokens(box[:4], size)


def parse_polygons(text: str, size: tuple[int, int], whole_pixels: bool = False,
                   labelled: bool = False) -> dict[str, list[Any]]:
    """``{"polygons": [[flat polygon, ...] per object], "labels": [...]}`` as ``post_process_generation`` returns for
    ``<REFERRING_EXPRESSION_SEGMENTATION>`` / ``<REGION_TO_SEGMENTATION>`` (``labelled=False``, labels empty), or the
    polygon half of ``<OPEN_VOCABULARY_DETECTION>`` (``labelled=True``: ``polygons`` / ``polygons_labels``).
    Coordinates are bin centres (``whole_pixels`` truncates them as the processor does)."""
    width, height = size
    polygons, labels = [], []
    for run in (_POLY_RUN_LABELLED if labelled else _POLY_RUN).findall(_clean(text)):
        stripped = re.sub(r"^<loc_\d+>", "", run, count=1)
        if not stripped and labelled:
            continue
        match = _POLY_LABEL.search(stripped)
        if not match:
            continue
        whole = POLY_START in run and POLY_END in run
        for instance in ([m.group(1) for m in _POLY_INSTANCE.finditer(run)] if whole else [run]):
            found = list(_POLYGON.finditer(instance))
            if not found:
                continue
            shapes = []
            for m in found:
                bins = [int(b) for b in _LOC_BIN.findall(m.group(1))]
                bins = bins[:-1] if len(bins) % 2 else bins
                coords = [dequantize(b, width if k % 2 == 0 else height) for k, b in enumerate(bins)]
                shapes.append([int(v) for v in coords] if whole_pixels else coords)
            polygons.append(shapes)
            labels.append(match.group().strip())
    return {"polygons": polygons, "labels": labels}


def parse_proposals(text: str, size: tuple[int, int], whole_pixels: bool = False) -> dict[str, list[Any]]:
    """``<REGION_PROPOSAL>``'s parse (type ``bboxes``): every run of 4+ ``<loc_*>`` read in fours; labels empty."""
    width, height = size
    bboxes, labels = [], []
    for run in _BOX_RUN.findall(_clean(text)):
        for m in _BOX.finditer(run):
            q = [int(m.group(j)) for j in range(1, 5)]
            box = [dequantize(q[0], width), dequantize(q[1], height), dequantize(q[2], width), dequantize(q[3], height)]
            bboxes.append([int(v) for v in box] if whole_pixels else box)
            labels.append("")
    return {"bboxes": bboxes, "labels": labels}


def prompt_box(prompt: str) -> list[int] | None:
    """The four bins of the box a region-in prompt carries (``<REGION_TO_OCR><loc_..>x4``); None without one."""
    bins = [int(b) for b in _LOC_BIN.findall(prompt)]
    return bins[:4] if len(bins) >= 4 else None


def clip_polygon(polygon: Sequence[float], size: tuple[int, int]) -> list[float]:
    """The part of a flat polygon inside the image (Sutherland-Hodgman on the four borders; concave ones are cut
    along the border); unchanged when it lies inside."""
    width, height = size
    if all(0 <= v <= (width if k % 2 == 0 else height) for k, v in enumerate(polygon)):
        return [float(v) for v in polygon]
    points = [(float(polygon[k]), float(polygon[k + 1])) for k in range(0, len(polygon) - 1, 2)]
    for axis, limit, below in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False), (1, float(height), True)):
        out: list[tuple[float, float]] = []
        for k, cur in enumerate(points):
            prev = points[k - 1]
            cur_in = cur[axis] <= limit if below else cur[axis] >= limit
            prev_in = prev[axis] <= limit if below else prev[axis] >= limit
            if cur_in != prev_in:
                t = (limit - prev[axis]) / (cur[axis] - prev[axis])
                other = prev[1 - axis] + t * (cur[1 - axis] - prev[1 - axis])
                out.append((limit, other) if axis == 0 else (other, limit))
            if cur_in:
                out.append(cur)
        points = out
    return [v for p in points for v in p]


def self_intersects(polygon: Sequence[float]) -> bool:
    """Whether two edges that share no vertex cross (a bow tie); polygons touching themselves at a point do not."""
    import numpy as np

    a = np.asarray(polygon, dtype=float).reshape(-1, 2)
    n = len(a)
    if n < 4:
        return False
    b = np.roll(a, -1, axis=0)

    def side(p: Any, q: Any, r: Any) -> Any:
        cross = (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
        return np.sign(cross)

    p1, p2, q1, q2 = a[:, None], b[:, None], a[None, :], b[None, :]
    crosses = (side(p1, p2, q1) * side(p1, p2, q2) < 0) & (side(q1, q2, p1) * side(q1, q2, p2) < 0)
    gap = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :])
    return bool((crosses & (gap > 1) & (gap < n - 1)).any())
