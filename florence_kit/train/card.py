"""The run folder's ``README.md``: a model card saying what was trained on what, how well, and how to load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TRAINING_KEYS = {"step", "loss", "lr", "samples", "elapsed_s"}
NOT_METRICS = ("event", "skipped")  # resume / early-stopping events and non-finite steps are no scores


def _base_model(model: str) -> str | None:
    """The hub id the run started from, for the card's metadata (None for a local folder)."""
    from florence_kit.model.checkpoint_io import resolve_model_id

    model_id, _ = resolve_model_id(model)
    return None if Path(model_id).expanduser().exists() or model_id.count("/") != 1 else model_id


def last_metrics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Non-training numbers (eval scores) from the last log record that has any (events are not scores)."""
    found: dict[str, Any] = {}
    for record in records:
        extra = {k: v for k, v in record.items() if k not in TRAINING_KEYS}
        if extra and not any(k in record for k in NOT_METRICS):
            found = {"step": record.get("step"), **extra}
    return found


def model_card(options: dict[str, Any], run: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Markdown with YAML front matter the hub understands."""
    from florence_kit.model.modes import ADAPTER_MODES

    base = _base_model(str(options.get("model", "")))
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags:", "- florence-2", "- florence-kit", f"- {options['task']}"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    steps = run.get("steps")
    loss = run.get("final_loss")
    lines = [
        *front, "",
        f"# Florence-2 fine-tuned on `{options['task']}`", "",
        "Trained with `florence-kit finetune`; every option is in `config.yaml` "
        "(`florence-kit finetune --config config.yaml` repeats the run).", "",
        "| | |", "| --- | --- |",
        f"| task | `{options['task']}` ({run.get('task_origin', '')}) |",
        f"| data | `{options.get('dataset') or 'the task default'}` ({run.get('examples', '?')} training examples, "
        f"{run.get('dropped', 0)} dropped as too long, {run.get('skipped_bad_images', 0)} skipped as unreadable) |",
        f"| starting model | `{options.get('model')}` |",
        f"| mode | `{options.get('mode')}` |",
        f"| steps | {steps} (batch {options.get('batch_size')} × accumulation {options.get('grad_accum')}, "
        f"lr {options.get('lr')}, {options.get('schedule')} schedule) |",
        f"| final training loss | {loss:.4f} |" if isinstance(loss, float) else "| final training loss | n/a |",
    ]
    if run.get("interrupted_at_step"):
        at, total = run["interrupted_at_step"], run.get("total_steps")
        lines.append(f"| note | interrupted (Ctrl-C) at step {at} of {total} |")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "", "## How to load", "", "```python",
        "from transformers import AutoProcessor, Florence2ForConditionalGeneration", "",
        'model = Florence2ForConditionalGeneration.from_pretrained("RUN_DIR")',
        'processor = AutoProcessor.from_pretrained("RUN_DIR")',
        "```", "",
        "or score it: `florence-kit eval " + str(options["task"]) + " --model RUN_DIR`.", "",
        *(["This folder holds a LoRA adapter (`adapter_model.safetensors`) on top of its base model; "
           "`florence-kit export RUN_DIR --merge OUT` writes a plain merged checkpoint.", ""]
          if options.get("mode") in ADAPTER_MODES else []),
        "`RUN_DIR` is this folder (or its hub repo id once pushed).", "",
    ]
    return "\n".join(lines)


def write_card(out: Path, options: dict[str, Any], run: dict[str, Any]) -> Path:
    """The card for the run in ``out``, with the scores its log ends on."""
    from florence_kit.train.runfolder import RunFolder

    folder = RunFolder(out)
    return folder.write_card(model_card(options, run, last_metrics(folder.metrics())))
