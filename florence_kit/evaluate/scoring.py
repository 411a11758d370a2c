"""Evaluation: batched generation → post-process → per-sample scores → aggregate → files.

Answers come from the batch engine that ``predict`` uses (:mod:`florence_kit.evaluate.batch`): examples are
batched by page and prompt length (right-padded), which gives the same predictions as one example at a time,
several times faster; records keep dataset order.

``predictions.jsonl`` (id, prompt, prediction, references, score, thumbnail) is written so a run can
be inspected and re-scored later with ``florence-kit score``; ``metrics.json`` holds the aggregate.
``thumbs/`` holds a small JPEG per example, so ``florence-kit report`` can show the page that was
asked about without the dataset at hand.
Generation itself lives in :mod:`florence_kit.evaluate.generation`; several tasks at once in
:mod:`florence_kit.evaluate.harness`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import BadImageError, UserError
from florence_kit.evaluate.batch import (  # thumbnail_jpeg: re-exported, the report's tests make thumbnails with it
    THUMBNAIL_SIZE,
    Answer,
    ImageRef,
    Request,
    Unreadable,
    answer_requests,
    runs_pages,
    thumbnail_jpeg,  # noqa: F401
)
from florence_kit.evaluate.generation import generation_config_for
from florence_kit.metrics import get_metric
from florence_kit.tasks.spec import TaskSpec

SECONDARY_METRICS = ("exact_match",)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    thumbnails: list[bytes] = field(default_factory=list)  # JPEG per prediction (same order), or empty
    bad_boxes: list[str] = field(default_factory=list)  # region tasks: the data's bad-box counts, to print


class ExampleImages:
    """Example ``ref.row``'s image as :class:`TaskDataset` decodes it (tiles, turns, region units), for the batch
    engine's workers: eval asks the engine about its examples as ``predict`` asks about files."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __call__(self, ref: ImageRef) -> Any:
        return self.dataset[int(ref.row)].image


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


def answer_and_score(
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
    """Answer every example of ``split`` with the batch engine (:func:`answer_requests`) and score the answers.

    Records come back in dataset order whatever order the batches ran in; predictions equal one-at-a-time
    generation (see :func:`florence_kit.evaluate.generation.encode`). ``by_page`` (``eval --speed auto``, the
    default): a page's questions go in one batch (pages in order of their longest prompt), each page decoded,
    resized and run through the vision tower once per batch; the answers are the same (tested). False (``--speed
    off``): one decode per question, batches sorted by prompt length (``sort_by_length``). ``num_workers`` > 0
    decodes images and runs the processor in DataLoader worker processes. ``thumbnail_size`` (pixels, None or 0
    for none) keeps a small JPEG of each page for the report. An image that cannot be read is an error naming
    its row: a score over the readable rows only would not be the split's.
    """
    from rich.progress import Progress

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.data.prepared import image_keys
    from florence_kit.data.region_targets import bad_box_lines

    dataset = TaskDataset(split, task, with_target=False)
    # one pass over the texts: prompts, ids and references, and a region task's bad boxes counted once (before
    # generation reads the rows again)
    described = list(dataset.descriptions())
    bad_boxes = bad_box_lines(dataset)
    pages = image_keys(dataset) if by_page and runs_pages(model) else [f"example-{i}" for i in range(len(dataset))]
    requests = [Request(i, ImageRef(str(i), row=i, page=page), prompt)
                for i, ((_, prompt, _), page) in enumerate(zip(described, pages, strict=True))]
    gen_config = generation_config_for(task, model, processor, num_beams=num_beams, max_new_tokens=max_new_tokens)
    records: list[dict[str, Any] | None] = [None] * len(dataset)
    thumbnails: list[bytes | None] = [None] * len(dataset)
    with Progress(disable=not show_progress, transient=True) as bar:
        progress_task = bar.add_task(f"evaluating {task.name}", total=len(dataset))
        for answers in answer_requests(model, processor, task, requests, gen_config, batch_size=batch_size,
                                       num_workers=num_workers, opener=ExampleImages(dataset), by_page=by_page,
                                       sort_by_length=sort_by_length, thumbnail_size=thumbnail_size, parse=False):
            for answer in answers:
                if isinstance(answer, Unreadable):
                    raise BadImageError(answer.reason)
                assert isinstance(answer, Answer)
                example_id, prompt, references = described[answer.index]
                records[answer.index] = {"id": example_id, "prompt": prompt, "prediction": answer.text,
                                         "references": references}
                thumbnails[answer.index] = answer.thumbnail
            bar.advance(progress_task, len(answers))
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


def summarise(metrics_by_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's content: each task's main score, counts, direction and folder."""
    tasks = {
        name: {"metric": m["metric"], "value": m.get(m["metric"]), "n": m["n"], "n_scored": m["n_scored"],
               "higher_is_better": m["higher_is_better"], "folder": name}
        for name, m in metrics_by_task.items()
    }
    return {"tasks": tasks}


def write_summary(metrics_by_task: dict[str, dict[str, Any]], out_dir: Path) -> None:
    """summary.json of a several-task eval (:func:`summarise`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "summary.json", json.dumps(summarise(metrics_by_task), indent=2) + "\n")


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
