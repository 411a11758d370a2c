"""``florence-kit eval``, ``score`` and ``predict``: score a checkpoint, re-score a file, answer once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from florence_kit.cli.common import (
    Attn,
    AttnOption,
    BoxFormatOption,
    CopyImagesOption,
    DatasetOption,
    GenerateBatchSizeOption,
    ImageColumnOption,
    LabelFormat,
    MaxNewTokensOption,
    MaxSamplesOption,
    ModelOption,
    NumBeamsOption,
    NumWorkersOption,
    PredictDatasetOption,
    PredictFormatOption,
    PredictOutputOption,
    PredictOverwriteOption,
    PredictStreamingOption,
    QuestionColumnOption,
    QuestionOption,
    QuietOption,
    Speed,
    SplitOption,
    StreamingOption,
    TaskOption,
    TasksDirOption,
    console,
    model_task,
    user_errors,
)


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
    model: ModelOption = "base",
    dataset: DatasetOption = None,
    split: Annotated[str | None, typer.Option(help="Split to score; default: the task's eval split.")] = None,
    output_dir: Annotated[Path, typer.Option(help="Where predictions.jsonl and metrics.json go.")] = Path(
        "runs/eval"
    ),
    batch_size: GenerateBatchSizeOption = 16,
    max_samples: MaxSamplesOption = None,
    streaming: StreamingOption = False,
    num_beams: NumBeamsOption = None,
    max_new_tokens: MaxNewTokensOption = None,
    num_workers: NumWorkersOption = 0,
    # --- regions ---
    box_format: BoxFormatOption = None,
    speed: Annotated[
        Speed, typer.Option(help="auto: a page's questions batched together, each page decoded and run through the "
                            "vision tower once (same answers); off: one decode per question, sorted by length.")
    ] = Speed.auto,
    attn: AttnOption = Attn.auto,
    quiet: QuietOption = False,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Generate answers for a task's eval split and score them with the task's metric.

    Examples:

      florence-kit eval docvqa --model runs/finetune --output-dir runs/eval

      florence-kit eval cauldron/ai2d,cauldron/chartqa --model runs/mix --split "train[:500]" --output-dir runs/eval
    """
    from florence_kit.evaluate.harness import run_eval

    def show(spec: Any, result: Any) -> None:
        for line in result.bad_boxes:
            console.print(line, markup=False)
        _print_metrics(result.metrics)

    run = run_eval(model, task, dataset=dataset, split=split, max_samples=max_samples, streaming=streaming,
                   output_dir=output_dir, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
                   num_workers=num_workers, box_format=box_format.value if box_format else None,
                   by_page=speed is Speed.auto, attn=attn.value, tasks_dirs=tasks_dir or [],
                   show_progress=not quiet, on_result=show)
    if len(run.results) == 1:
        console.print(f"predictions: {output_dir / 'predictions.jsonl'}")
    else:
        console.print(f"{len(run.results)} tasks: predictions in {output_dir}/<task>/, scores in "
                      f"{output_dir / 'summary.json'}")


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
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Image files, folders (recursive), globs or @list.txt (one path a line; @list.jsonl: image and "
        "question). One image without --output: the answer is printed.", show_default=False)] = None,
    task: TaskOption = None,
    model: ModelOption = "base",
    question: QuestionOption = None,
    box: Annotated[str | None, typer.Option(
        help="x1,y1,x2,y2 in pixels: the region of region-in tasks (region-category, region-ocr, ...); over many "
        "inputs, of every input that has no box of its own (--box-column, or 'box' in @list.jsonl).")] = None,
    num_beams: NumBeamsOption = None,
    attn: AttnOption = Attn.auto,
    tasks_dir: TasksDirOption = None,
    # --- many images ---
    output: PredictOutputOption = None,
    format_: PredictFormatOption = LabelFormat.jsonl,
    overwrite: PredictOverwriteOption = False,
    dataset: PredictDatasetOption = None,
    split: SplitOption = None,
    image_column: ImageColumnOption = "image",
    question_column: QuestionColumnOption = None,
    box_column: Annotated[str | None, typer.Option(
        help="--dataset column holding each row's box (x1,y1,x2,y2 in pixels, text or four numbers) for region-in "
        "tasks.")] = None,
    streaming: PredictStreamingOption = False,
    copy_images: CopyImagesOption = False,
    batch_size: GenerateBatchSizeOption = 16,
    num_workers: NumWorkersOption = 0,
    max_new_tokens: MaxNewTokensOption = None,
    quiet: QuietOption = False,
) -> None:
    """Answer one image, or many into one file (resumable; torchrun for several processes or machines).

    Examples:

      florence-kit predict page.png --task docvqa --model runs/finetune --question "What is the total?"

      florence-kit predict photos/ --task caption --model runs/caption --output captions.jsonl

      florence-kit predict photos/ --task od --model large-ft --output labels --format coco
    """
    from florence_kit.common.errors import UserError

    many = output is not None or dataset is not None or format_ is not LabelFormat.jsonl
    if not many:
        if not inputs or len(inputs) != 1:
            raise UserError("several inputs need --output OUT (.jsonl or .parquet), where every answer is written")
        _predict_one(Path(inputs[0]), task, model, question, box, num_beams, attn, tasks_dir)
        return
    if output is None:
        raise UserError("--dataset and --format need --output OUT")
    if inputs and dataset:
        raise UserError("pass image paths or --dataset, not both")
    if not inputs and not dataset:
        raise UserError("nothing to answer: pass image files, folders, globs, @list.txt or --dataset")
    _predict_many(inputs or [], output, format_.value, task=task, model=model, question=question,
                  num_beams=num_beams, max_new_tokens=max_new_tokens, attn=attn, tasks_dir=tasks_dir,
                  overwrite=overwrite, dataset=dataset, split=split, image_column=image_column,
                  question_column=question_column, streaming=streaming, copy_images=copy_images,
                  batch_size=batch_size, num_workers=num_workers, quiet=quiet, box=box, box_column=box_column)


def _predict_many(inputs: list[str], output: Path, fmt: str, *, task: str | None, model: str, question: str | None,
                  num_beams: int | None, max_new_tokens: int | None, attn: Attn, tasks_dir: list[Path] | None,
                  overwrite: bool, dataset: str | None, split: str | None, image_column: str,
                  question_column: str | None, streaming: bool, copy_images: bool, batch_size: int,
                  num_workers: int, quiet: bool, box: str | None = None, box_column: str | None = None) -> None:
    """``predict`` over many inputs: everything the user typed checked before the model loads."""
    import os

    from florence_kit.common.errors import UserError
    from florence_kit.evaluate.corpus import dist_info, expand_inputs, predict_corpus, records_path, sidecar_path
    from florence_kit.evaluate.generation import generation_config_for
    from florence_kit.model.loading import load_for_generation
    from florence_kit.model.onnx_runtime import export_tasks_dirs
    from florence_kit.tasks.registry import get_task
    from florence_kit.tasks.spec import template_fields

    dirs = [*(tasks_dir or []), *export_tasks_dirs(model)]
    spec = get_task(task or model_task(model, dirs), dirs)
    region = "region" in template_fields(spec.prompt)  # {region}: a box per input, written in once its image is open
    fields = [name for name in template_fields(spec.prompt) if name != "region"]
    if not region and (box is not None or box_column):
        raise UserError(f"task '{spec.name}' asks about no region (its prompt is {spec.prompt!r}): leave out --box "
                        "and --box-column")
    if fmt in ("coco", "yolo") and (spec.regions or {}).get("kind") not in ("od", "open-vocab-od", "grounding",
                                                                            "region-proposal"):
        raise UserError(f"--format {fmt} writes boxes and their class names, which task '{spec.name}' does not "
                        "answer: use --format florence-jsonl (prompt and answer per image)")
    if fmt == "jsonl" and output.suffix.lower() not in (".jsonl", ".parquet"):
        raise UserError(f"--output '{output}' must end in .jsonl or .parquet (or pass --format coco|yolo|"
                        "florence-jsonl for a dataset folder)")
    if fmt != "jsonl" and output.exists() and not output.is_dir():
        raise UserError(f"--format {fmt} writes a folder, but '{output}' is a file")
    rows, blocks, items, varied, source = None, None, None, False, None
    if dataset:
        from florence_kit.evaluate.corpus import dataset_items

        if streaming and fmt != "jsonl":
            raise UserError("--format writes the images into OUT, which a --streaming dataset does not keep: "
                            "download it (leave out --streaming)")
        found = dataset_items(dataset, split, image_column, question_column, streaming, box_column)
        items, rows, blocks, varied = found.items, found.rows, found.blocks, found.varied_questions
        source = {"dataset": dataset, "split": found.split}  # the keys are its row numbers
    else:
        if question_column or box_column:
            raise UserError("--question-column and --box-column read --dataset; for files use @list.jsonl with "
                            "'question' and 'box' fields")
        items = expand_inputs(inputs)
        varied = any(item.question is not None for item in items)
    if items is not None and not items:
        raise UserError("nothing to answer: the inputs hold no image")

    def prompt_for(item: Any) -> str:
        asked = item.question if item.question is not None else question
        if not fields:
            return spec.prompt
        if asked is None:
            raise UserError(f"task '{spec.name}' needs a question (its prompt is {spec.prompt!r}): pass --question, "
                            "--question-column or @list.jsonl with 'question'")
        return spec.prompt.format(**{name: asked for name in fields}, region="{region}")

    def box_for(item: Any) -> str | None:
        # an input with no box of its own and no --box: "" puts it in the sidecar ("no box given"), the run goes on
        return (item.box if item.box is not None else box or "") if region else None

    if region and box is None and not box_column and not any(item.box is not None for item in items or []):
        raise UserError(f"task '{spec.name}' asks about a box (its prompt is {spec.prompt!r}): pass --box x1,y1,x2,y2, "
                        "--box-column or @list.jsonl with 'box'")

    for item in items or []:
        prompt_for(item)  # a missing question fails before the model loads
    if items is None and fields and not varied and question is None:
        raise UserError(f"task '{spec.name}' needs a question (its prompt is {spec.prompt!r}): pass --question or "
                        "--question-column")
    # what a rerun must match: the prompt, or the task's template where each input has its own question
    prompt_label = (spec.prompt if varied or region or not fields
                    else spec.prompt.format(**{f: question for f in fields}))
    dist_info()  # under torchrun: join the group and take this process's GPU before the model goes to one
    net, processor = load_for_generation(model, attn.value)
    gen_config = generation_config_for(spec, net, processor, num_beams=num_beams, max_new_tokens=max_new_tokens)
    counts = predict_corpus(net, processor, spec, items, output, model_name=model, prompt_for=prompt_for,
                            gen_config=gen_config, prompt_label=prompt_label, fmt=fmt, rows=rows, blocks=blocks,
                            image_column=image_column, batch_size=batch_size, num_workers=num_workers,
                            overwrite=overwrite, copy_images=copy_images, show_progress=not quiet, source=source,
                            box_for=box_for)
    if os.environ.get("RANK", "0") == "0":
        records = records_path(output, fmt)
        bad = f" (listed in {sidecar_path(records)})" if counts.unreadable else ""
        console.print(f"predict: {counts.answered} answered, {counts.skipped} skipped as already done, "
                      f"{counts.unreadable} unreadable{bad}; output: {output}", markup=False, highlight=False,
                      soft_wrap=True)


def _predict_one(image: Path, task: str | None, model: str, question: str | None, box: str | None,
                 num_beams: int | None, attn: Attn, tasks_dir: list[Path] | None) -> None:
    """One image: the answer printed (region tasks: as JSON, and drawn into a PNG beside the image)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from florence_kit.common.errors import UserError
    from florence_kit.data.dataset import to_rgb
    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.evaluate.region_answers import render_prompt
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
        from florence_kit.evaluate.region_answers import generate_raw, parse_answer, parse_box_text, png_path
        from florence_kit.present.draw import draw_answer

        parsed = parse_answer(spec, processor, generate_raw(net, processor, picture, prompt, gen_config), picture.size)
        typer.echo(json.dumps(parsed, ensure_ascii=False))
        if isinstance(parsed, str):  # a region-in task's text answer: drawn as the label of the box it was asked about
            parsed = {"bboxes": [parse_box_text(box or "", picture.size)], "labels": [parsed]}
        drawn = draw_answer(picture, parsed, png_path(image, spec))
        typer.echo(f"regions drawn: {drawn}" if drawn else "no regions in the answer (nothing drawn)")
        return
    typer.echo(generate(net, processor, [picture], [prompt], gen_config)[0])
