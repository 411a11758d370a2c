"""Evaluation: batched generation → post-process → per-sample scores → aggregate → files.

Examples are sorted by prompt length and batched (right-padded, see :func:`encode`), which gives the
same predictions as one example at a time, several times faster; records keep dataset order.

``predictions.jsonl`` (id, prompt, prediction, references, score, thumbnail) is written so a run can
be inspected and re-scored later with ``florence-kit score``; ``metrics.json`` holds the aggregate.
``thumbs/`` holds a small JPEG per example, so ``florence-kit report`` can show the page that was
asked about without the dataset at hand.
Generation itself lives in :mod:`florence_kit.evaluate.generation`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.evaluate.generation import (
    encode,
    encode_pages,
    generate_from_inputs,
    generate_pages,
    generation_config_for,
    page_order,
    prompt_lengths,
)
from florence_kit.metrics import get_metric
from florence_kit.tasks.spec import TaskSpec

SECONDARY_METRICS = ("exact_match",)
THUMBNAIL_SIZE = 256  # longest side in pixels of the per-example JPEGs under thumbs/


@dataclass
class EvalBatch:
    """What one loader step yields: the rows' dataset indices, their metadata, thumbnails and model inputs."""

    indices: list[int]
    ids: list[str]
    prompts: list[str]
    references: list[list[str]]
    thumbnails: list[bytes]
    inputs: Any


class EvalCollator:
    """Examples → :class:`EvalBatch`; runs in DataLoader workers, so decoding and preprocessing overlap.

    With ``keys`` (one image key per example, :func:`florence_kit.data.prepared.image_keys`) each distinct page of
    a batch is decoded, resized and thumbnailed once, and the inputs carry it once (:func:`encode_pages`).
    """

    def __init__(self, dataset: Any, processor: Any, thumbnail_size: int | None,
                 keys: list[str] | None = None) -> None:
        self.dataset = dataset
        self.processor = processor
        self.thumbnail_size = thumbnail_size
        self.keys = keys

    def __call__(self, indices: list[int]) -> EvalBatch:
        if self.keys is not None:
            return self.by_page(indices)
        examples = [self.dataset[i] for i in indices]
        size = self.thumbnail_size
        return EvalBatch(
            indices=list(indices),
            ids=[ex.id for ex in examples],
            prompts=[ex.prompt for ex in examples],
            references=[ex.references for ex in examples],
            thumbnails=[thumbnail_jpeg(ex.image, size) for ex in examples] if size else [],
            inputs=encode(self.processor, [ex.image for ex in examples], [ex.prompt for ex in examples]),
        )

    def by_page(self, indices: list[int]) -> EvalBatch:
        assert self.keys is not None
        slot: dict[str, int] = {}
        image_index = [slot.setdefault(self.keys[i], len(slot)) for i in indices]
        firsts = {s: pos for pos, s in reversed(list(enumerate(image_index)))}  # first row showing each page
        examples = [self.dataset[i] if firsts[s] == pos else self.dataset.metadata(i)
                    for pos, (i, s) in enumerate(zip(indices, image_index, strict=True))]
        images = [examples[firsts[s]].image for s in range(len(slot))]
        size = self.thumbnail_size
        thumbs = [thumbnail_jpeg(image, size) for image in images] if size else []
        return EvalBatch(
            indices=list(indices),
            ids=[ex.id for ex in examples],
            prompts=[ex.prompt for ex in examples],
            references=[ex.references for ex in examples],
            thumbnails=[thumbs[s] for s in image_index] if size else [],
            inputs=encode_pages(self.processor, images, [ex.prompt for ex in examples], image_index),
        )


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    thumbnails: list[bytes] = field(default_factory=list)  # JPEG per prediction (same order), or empty
    bad_boxes: list[str] = field(default_factory=list)  # region tasks: the data's bad-box counts, to print


def thumbnail_jpeg(image: Any, size: int = THUMBNAIL_SIZE) -> bytes:
    """A small JPEG of ``image`` (longest side ``size``): enough to recognise the page in a report."""
    import io

    small = image.convert("RGB")
    small.thumbnail((size, size))
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def score_records(
    task_metric: str, records: Iterable[dict[str, Any]], extra_metrics: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fill in per-sample scores and aggregate; rows without references are kept but not scored.

    The task's metric gives each record's ``score``; ``extra_metrics`` (the task's further metrics)
    and exact match are aggregated beside it. Set-level metrics (CIDEr, BLEU-4, CER) see the whole
    scored set at once, which is why scores are computed per metric, not per record.
    """
    metric = get_metric(task_metric)
    records = list(records)
    scored = [rec for rec in records if rec.get("references")]
    for rec in records:
        rec["score"] = None
    names = list(dict.fromkeys([metric.name, *extra_metrics, *SECONDARY_METRICS]))
    summary: dict[str, Any] = {"metric": metric.name, "n": len(records), "n_scored": len(scored)}
    predictions = [str(rec.get("prediction", "")) for rec in scored]
    references = [list(rec["references"]) for rec in scored]
    for name in names:
        if not scored:
            summary[name] = None
            continue
        per_sample, total, details = get_metric(name).compute_with_details(predictions, references)
        summary[name] = total
        if details:  # e.g. mAP@.5, per-class AP and unknown class names for region tasks
            summary[f"{name}_details"] = details
        if name == metric.name:
            for rec, value in zip(scored, per_sample, strict=True):
                rec["score"] = value
    summary["higher_is_better"] = metric.higher_is_better
    return records, summary


def evaluate(
    model: Any,
    processor: Any,
    task: TaskSpec,
    split: Any,
    *,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    show_progress: bool = True,
    thumbnail_size: int | None = THUMBNAIL_SIZE,
    sort_by_length: bool = True,
    num_workers: int = 0,
    by_page: bool = True,
) -> EvalResult:
    """Generate for every example of ``split`` in batches and score against the references.

    Batches are formed from examples sorted by prompt length (``sort_by_length``) to cut padding;
    records come back in dataset order. Predictions equal one-at-a-time generation (see :func:`encode`).
    ``num_workers`` > 0 decodes images and runs the processor in DataLoader worker processes.
    ``thumbnail_size`` (pixels, None or 0 for none) keeps a small JPEG of each page for the report.
    ``by_page`` (``eval --speed auto``, the default): a page's questions go in one batch (pages in order of their
    longest prompt), and each page is decoded, resized and run through the vision tower once per batch; the
    answers are the same (tested). ``--speed off``: one decode per question, batches sorted by prompt length.
    """
    from rich.progress import Progress
    from torch.utils.data import DataLoader

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.data.prepared import image_keys
    from florence_kit.data.regions import bad_box_lines

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be 0 or more, got {num_workers}")
    dataset = TaskDataset(split, task, with_target=False)
    order = list(range(len(dataset)))
    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    by_page = by_page and hasattr(getattr(native, "model", None), "get_image_features")  # an ONNX export: whole graphs
    # one pass over the texts: the length order, and a region task's bad boxes counted once (before generation
    # reads the rows again)
    prompts = [prompt for _, prompt, _ in dataset.texts()] if sort_by_length or by_page or task.regions else []
    bad_boxes = bad_box_lines(dataset)
    keys = image_keys(dataset) if by_page else None
    lengths = prompt_lengths(processor, prompts) if sort_by_length and len(prompts) == len(order) else None
    if keys is not None:
        order = page_order(keys, lengths or [0] * len(order))
    elif lengths is not None:
        order = sorted(order, key=lambda i: -lengths[i])
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    loader = DataLoader(
        batches,  # each item is already a list of dataset indices: the collator loads and encodes them
        batch_size=None,
        collate_fn=EvalCollator(dataset, processor, thumbnail_size, keys),
        num_workers=num_workers,
    )
    gen_config = generation_config_for(task, model, processor, num_beams=num_beams, max_new_tokens=max_new_tokens)
    model.eval()
    records: list[dict[str, Any] | None] = [None] * len(dataset)
    thumbnails: list[bytes | None] = [None] * len(dataset)
    with Progress(disable=not show_progress, transient=True) as bar:
        progress_task = bar.add_task(f"evaluating {task.name}", total=len(dataset))
        for batch in loader:
            generate_batch = generate_pages if "image_index" in batch.inputs else generate_from_inputs
            answers = generate_batch(model, processor, batch.inputs, gen_config)
            for pos, (index, answer) in enumerate(zip(batch.indices, answers, strict=True)):
                records[index] = {
                    "id": batch.ids[pos],
                    "prompt": batch.prompts[pos],
                    "prediction": answer,
                    "references": batch.references[pos],
                }
                if batch.thumbnails:
                    thumbnails[index] = batch.thumbnails[pos]
            bar.advance(progress_task, len(batch.indices))
    scored, summary = score_records(task.metric, records, task.extra_metrics)
    summary["task"] = task.name
    return EvalResult(summary, scored, [t for t in thumbnails if t is not None] if thumbnail_size else [], bad_boxes)


def _atomic_write(path: Path, text: str) -> None:
    """Write next to the target and rename, so an interrupted run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")  # not the locale's: answers hold any script, Windows too
    os.replace(tmp, path)


def write_results(result: EvalResult, out_dir: Path) -> None:
    """predictions.jsonl + metrics.json, and thumbs/NNNNNN.jpg named in each record's ``thumbnail``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.thumbnails:
        (out_dir / "thumbs").mkdir(exist_ok=True)
        for index, (rec, jpeg) in enumerate(zip(result.predictions, result.thumbnails, strict=True)):
            rec["thumbnail"] = f"thumbs/{index:06d}.jpg"
            (out_dir / rec["thumbnail"]).write_bytes(jpeg)
    lines = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in result.predictions)
    _atomic_write(out_dir / "predictions.jsonl", lines)
    _atomic_write(out_dir / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")


def write_summary(metrics_by_task: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """summary.json of a several-task eval: each task's main score, counts, direction and folder."""
    tasks = {
        name: {"metric": m["metric"], "value": m.get(m["metric"]), "n": m["n"], "n_scored": m["n_scored"],
               "higher_is_better": m["higher_is_better"], "folder": name}
        for name, m in metrics_by_task.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "summary.json", json.dumps({"tasks": tasks}, indent=2) + "\n")


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Lines with ``prediction`` and ``references``; a malformed line is an error naming it and the fix.

    The file is often edited by hand, so what the metrics cannot read is refused here, with its line number,
    rather than failing inside a metric: a prediction must be text, references a list of texts (a region
    reference may be its JSON object), and a number written without quotes is not silently read as text.
    """
    if not path.is_file():
        raise UserError(f"predictions file '{path}' does not exist")
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1}); re-save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "prediction" not in rec or "references" not in rec:
            raise UserError(f"{path}:{number}: each line needs 'prediction' and 'references'")
        records.append(_checked_record(rec, f"{path}:{number}"))
    return records


def _checked_record(rec: dict[str, Any], where: str) -> dict[str, Any]:
    """``rec`` with a single reference string made a list; a value a metric cannot read is a UserError."""
    refs = rec["references"]
    if isinstance(refs, str):
        refs = rec["references"] = [refs]
    if not isinstance(rec["prediction"], str):
        raise UserError(f"{where}: 'prediction' must be a JSON string, got {json.dumps(rec['prediction'])}; "
                        'write it in quotes (an empty answer is "")')
    if refs is not None and not (isinstance(refs, list) and all(isinstance(r, (str, dict)) for r in refs)):
        raise UserError(f"{where}: 'references' must be a list of JSON strings, got {json.dumps(refs)}; "
                        'write each one in quotes, e.g. ["1990"] (or [] / null for a row without answers)')
    return rec
