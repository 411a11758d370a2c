"""Florence-2's ``<loc_*>`` form: the quantiser that writes targets and a parser that reads answers.

Florence-2 writes a region as a label followed by ``<loc_x1><loc_y1><loc_x2><loc_y2>`` (quadrilaterals:
eight tokens), coordinates in 1000 bins of the image's width and height. The native post-processor
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


def decode_answers(processor: Any, sequences: Any) -> list[str]:
    """Generated ids -> answer texts with every special token removed EXCEPT ``<loc_*>``.

    Microsoft's Florence-2 tokenizers list the 1000 location tokens among the special tokens, so
    ``batch_decode(..., skip_special_tokens=True)`` would erase every box of a region answer; other
    tokenizers (ours, some conversions) do not. Decoding with the specials and removing all but the
    location tokens gives the same text either way, and the same text as before for answers without boxes.
    """
    tok = processor.tokenizer
    specials = sorted((t for t in tok.all_special_tokens if not _LOC_TOKEN.fullmatch(t)), key=len, reverse=True)
    out = []
    for text in processor.batch_decode(sequences, skip_special_tokens=False):
        for token in specials:
            text = text.replace(token, "")
        out.append(text.strip())
    return out
