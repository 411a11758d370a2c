"""``florence-kit eval``, ``score`` and ``predict``: score a checkpoint, re-score a file, answer once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import Attn, AttnOption, Speed, TasksDirOption, console, model_task, user_errors
from florence_kit.tasks.regions import BoxFormat


def _print_metrics(metrics: dict) -> None:
    name = metrics["metric"]
    value = metrics.get(name)
    shown = "n/a (no references)" if value is None else f"{value:.4f}"
    from florence_kit.metrics import available_metrics

    others = [f"{k} {v:.4f}" for k, v in metrics.items() if k != name and k in available_metrics() and v is not None]
    also = f"; {', '.join(others)}" if others else ""
    console.print(
        f"[bold]{metrics.get('task', '')} {name}[/]: {shown}  ({metrics['n_scored']}/{metrics['n']} scored{also})"
    )
    details = metrics.get(f"{name}_details") or {}
    if details.get("unknown_labels"):  # region tasks: generated class names outside the label set
        names = ", ".join(f"{k!r} x{v}" for k, v in details["unknown_label_names"].items())
        console.print(f"{details['unknown_labels']} generated box(es) named no known class: {names}", markup=False)


@user_errors
def eval_(
    task: Annotated[
        str,
        typer.Argument(help="Task name, a comma list of tasks or a group (e.g. cauldron); see `florence-kit tasks "
                       "list`. Several tasks: each is scored into OUTPUT_DIR/<task>/, with OUTPUT_DIR/summary.json."),
    ],
    model: Annotated[str, typer.Option(help="Checkpoint folder, hub id, or base/large/base-ft/large-ft.")] = "base",
    dataset: Annotated[
        str | None, typer.Option(help="Hub id or local data; default: the task's (one task only).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split to score; default: the task's eval split.")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where predictions.jsonl and metrics.json go.")] = Path(
        "runs/eval"
    ),
    batch_size: Annotated[
        int, typer.Option(help="Examples per generate() call (sorted by prompt length; same answers as 1).")
    ] = 16,
    max_samples: Annotated[int | None, typer.Option(help="Score only the first N rows.")] = None,
    streaming: Annotated[
        bool, typer.Option(help="Stream a hub dataset instead of downloading it whole (needs --max-samples).")
    ] = False,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width; default: the task's (1).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Answer length cap; default: the task's.")] = None,
    num_workers: Annotated[
        int, typer.Option(help="DataLoader workers that decode images and run the processor (0: in-process).")
    ] = 0,
    # --- regions ---
    box_format: Annotated[
        BoxFormat | None,
        typer.Option(help="Region tasks: how the data writes boxes (default: the task's, xywh as COCO)."),
    ] = None,
    speed: Annotated[
        Speed, typer.Option(help="auto: a page's questions batched together, each page decoded and run through the "
                            "vision tower once (same answers); off: one decode per question, sorted by length.")
    ] = Speed.auto,
    attn: AttnOption = Attn.auto,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Generate answers for a task's eval split and score them with the task's metric.

    Examples:

      florence-kit eval docvqa --model runs/finetune --output-dir runs/eval

      florence-kit eval cauldron/ai2d,cauldron/chartqa --model runs/mix --split "train[:500]" --output-dir runs/eval
    """
    from florence_kit.common.errors import UserError
    from florence_kit.data.dataset import cap_rows, load_split
    from florence_kit.evaluate.scoring import evaluate, write_results, write_summary
    from florence_kit.model.loading import load_for_generation
    from florence_kit.model.onnx_runtime import export_tasks_dirs
    from florence_kit.tasks.regions import with_box_format
    from florence_kit.tasks.registry import resolve_tasks

    tasks_dirs = [*(tasks_dir or []), *export_tasks_dirs(model)]  # an ONNX export brings its run's task files
    specs = [with_box_format(s, box_format.value if box_format else None) for s in resolve_tasks(task, tasks_dirs)]
    if dataset and len(specs) > 1:
        raise UserError(f"--dataset names one task's data, but '{task}' is {len(specs)} tasks: evaluate them one at "
                        "a time with --dataset, or without it each task reads its own source")

    # every task's data first: a bad dataset or split fails before the model loads, not after hours of tasks
    splits = [cap_rows(load_split(spec, dataset, split or spec.dataset.eval_split, streaming=streaming), max_samples)
              for spec in specs]
    net, processor = load_for_generation(model, attn.value)
    scored: dict[str, dict] = {}
    for spec, data in zip(specs, splits, strict=True):
        result = evaluate(net, processor, spec, data, batch_size=batch_size, num_beams=num_beams,
                          max_new_tokens=max_new_tokens, show_progress=not quiet, num_workers=num_workers,
                          by_page=speed is Speed.auto)
        folder = output_dir if len(specs) == 1 else output_dir / spec.name
        write_results(result, folder)
        for line in result.bad_boxes:
            console.print(line, markup=False)
        _print_metrics(result.metrics)
        scored[spec.name] = result.metrics
        if len(specs) > 1:  # after every task: a failure later keeps what is done
            write_summary(scored, output_dir)
    if len(specs) == 1:
        # a summary.json left by an earlier several-task eval here would make `report` show that one instead
        (output_dir / "summary.json").unlink(missing_ok=True)
        console.print(f"predictions: {output_dir / 'predictions.jsonl'}")
    else:
        summary = output_dir / "summary.json"
        console.print(f"{len(specs)} tasks: predictions in {output_dir}/<task>/, scores in {summary}")


@user_errors
def score(
    task: Annotated[str, typer.Argument(help="Task whose metric to use.")],
    predictions: Annotated[Path, typer.Argument(help="JSONL with 'prediction' and 'references' per line.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print {\"<metric>\": value} as JSON.")] = False,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Re-score a predictions file with the task's metric.

    Example: florence-kit score docvqa runs/eval/predictions.jsonl --json
    """
    from florence_kit.common.errors import UserError
    from florence_kit.evaluate.scoring import read_predictions, score_records
    from florence_kit.tasks.registry import get_task

    spec = get_task(task, tasks_dir or [])
    records = read_predictions(predictions)
    if not records:  # else it would print "n/a" and exit 0, as if the file were fine
        raise UserError(f"{predictions} holds no predictions; each line needs a JSON object with 'prediction' "
                        "and 'references', as `florence-kit eval` writes them in predictions.jsonl")
    _, metrics = score_records(spec.metric, records, spec.extra_metrics)
    if as_json:
        typer.echo(json.dumps({spec.metric: metrics[spec.metric]}))
    else:
        metrics["task"] = spec.name
        _print_metrics(metrics)


@user_errors
def predict(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    task: Annotated[str | None, typer.Option(help="Task whose prompt and generation settings to use; default: the "
                                           "task the run or export was made for, else docvqa.")] = None,
    model: Annotated[str, typer.Option(help="Checkpoint folder, hub id, or base/large/base-ft/large-ft.")] = "base",
    question: Annotated[str | None, typer.Option(help="The question (for tasks whose prompt has one).")] = None,
    box: Annotated[str | None, typer.Option(
        help="x1,y1,x2,y2 in pixels: the region of region-in tasks (region-category, region-ocr, ...).")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width; default: the task's (1).")] = None,
    attn: AttnOption = Attn.auto,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Answer one image with a model.

    Example: florence-kit predict page.png --task docvqa --model runs/finetune --question "What is the total?"
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from florence_kit.common.errors import UserError
    from florence_kit.data.dataset import to_rgb
    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.evaluate.regions import render_prompt
    from florence_kit.model.loading import load_for_generation
    from florence_kit.model.onnx_runtime import export_tasks_dirs
    from florence_kit.tasks.registry import get_task

    dirs = [*(tasks_dir or []), *export_tasks_dirs(model)]
    spec = get_task(task or model_task(model, dirs), dirs)
    try:
        # upright as EXIF says (a phone photo), as `datasets` decodes the images eval and finetune see
        picture = to_rgb(ImageOps.exif_transpose(Image.open(image)))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:  # the last is no OSError
        raise UserError(f"cannot read image '{image}': {exc}") from None
    prompt = render_prompt(spec, question, box, picture.size)  # {region}: --box as <loc_*> tokens
    net, processor = load_for_generation(model, attn.value)
    gen_config = generation_config_for(spec, net, processor, num_beams=num_beams)
    if spec.regions:  # --- regions: parsed boxes as JSON, drawn into a PNG beside the image ---
        from florence_kit.evaluate.regions import generate_raw, parse_answer, parse_box_text, png_path
        from florence_kit.present.draw import draw_answer

        parsed = parse_answer(spec, processor, generate_raw(net, processor, picture, prompt, gen_config), picture.size)
        typer.echo(json.dumps(parsed, ensure_ascii=False))
        if isinstance(parsed, str):  # a region-in task's text answer: drawn as the label of the box it was asked about
            parsed = {"bboxes": [parse_box_text(box or "", picture.size)], "labels": [parsed]}
        drawn = draw_answer(picture, parsed, png_path(image, spec))
        typer.echo(f"regions drawn: {drawn}" if drawn else "no regions in the answer (nothing drawn)")
        return
    typer.echo(generate(net, processor, [picture], [prompt], gen_config)[0])
