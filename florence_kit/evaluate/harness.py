"""Evaluation as a library call: a model and one task or many → each task's scores, and the files ``eval`` writes.

:func:`run_eval` is what ``florence-kit eval`` runs (the command only parses its options and prints), in the shape
of lm-evaluation-harness's ``simple_evaluate``: a model (a checkpoint, an alias, an ONNX export, or a loaded
pair), task names or specs, the data (source, split, row cap, streaming) and generation settings in; a result per
task out. Answers come from the batch engine ``predict`` uses (:func:`answer_and_score`). With ``output_dir``
one task writes predictions.jsonl, metrics.json and thumbs/ there; several write each into ``<output_dir>/<task>/``
and ``summary.json`` after every task, so a failure later keeps what is done.

    from florence_kit.evaluate import run_eval
    run = run_eval("runs/finetune", "docvqa", max_samples=200)
    run.metrics["docvqa"]["anls"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.evaluate.scoring import EvalResult, answer_and_score, summarise, write_results, write_summary
from florence_kit.tasks.spec import TaskSpec


@dataclass
class EvalOutcome:
    """What :func:`run_eval` scored: each task's result in the order asked, and where its files went."""

    results: dict[str, EvalResult] = field(default_factory=dict)
    output_dir: Path | None = None

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """Task name → its metrics.json."""
        return {name: result.metrics for name, result in self.results.items()}

    @property
    def summary(self) -> dict[str, Any]:
        """Each task's main score, counts and direction, as summary.json holds them."""
        return summarise(self.metrics)


def resolve_specs(tasks: str | Sequence[str | TaskSpec], tasks_dirs: Sequence[Path] = (),
                  box_format: str | None = None) -> list[TaskSpec]:
    """``docvqa``, ``cauldron/ai2d,cauldron/chartqa``, a group, or a list of names and specs → specs, in order."""
    from florence_kit.tasks.region_block import with_box_format
    from florence_kit.tasks.registry import resolve_tasks

    chosen = [tasks] if isinstance(tasks, (str, TaskSpec)) else list(tasks)
    specs = [s for item in chosen for s in ([item] if isinstance(item, TaskSpec) else resolve_tasks(item, tasks_dirs))]
    if not specs:
        raise UserError("no task given; see `florence-kit tasks list`")
    return [with_box_format(spec, box_format) for spec in specs]


def run_eval(
    model: str | tuple[Any, Any],
    tasks: str | Sequence[str | TaskSpec],
    *,
    dataset: str | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    streaming: bool = False,
    output_dir: Path | str | None = None,
    batch_size: int = 16,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    num_workers: int = 0,
    box_format: str | None = None,
    by_page: bool = True,
    attn: str = "auto",
    tasks_dirs: Sequence[Path] = (),
    show_progress: bool = False,
    on_result: Callable[[TaskSpec, EvalResult], None] | None = None,
) -> EvalOutcome:
    """Answer and score each task's eval split (or ``split``), writing ``eval``'s files when given ``output_dir``.

    ``model``: a checkpoint folder, an alias (``base``, ``large-ft``), an ONNX export (its own task files are found)
    or an already loaded ``(model, processor)``. ``dataset`` replaces one task's source (refused for several tasks);
    ``max_samples`` caps the rows (a ``streaming`` split is read only that far). Every task's data is loaded before
    the model, so a bad dataset or split fails in seconds, not after hours of other tasks. ``on_result`` sees each
    task's result as soon as it is scored (the CLI prints it).
    """
    from florence_kit.data.dataset import cap_rows, load_split
    from florence_kit.model.onnx_runtime import export_tasks_dirs

    name = model if isinstance(model, str) else None
    dirs = [*tasks_dirs, *export_tasks_dirs(name)]  # an ONNX export brings its run's task files
    specs = resolve_specs(tasks, dirs, box_format)
    if dataset and len(specs) > 1:
        asked = tasks if isinstance(tasks, str) else ",".join(s.name for s in specs)
        raise UserError(f"--dataset names one task's data, but '{asked}' is {len(specs)} tasks: evaluate them one at "
                        "a time with --dataset, or without it each task reads its own source")
    splits = [cap_rows(load_split(spec, dataset, split or spec.dataset.eval_split, streaming=streaming), max_samples)
              for spec in specs]
    if name is not None:
        from florence_kit.model.loading import load_for_generation

        net, processor = load_for_generation(name, attn)
    else:
        net, processor = model  # type: ignore[misc]
    out = Path(output_dir) if output_dir is not None else None
    run = EvalOutcome(output_dir=out)
    for spec, data in zip(specs, splits, strict=True):
        result = answer_and_score(net, processor, spec, data, batch_size=batch_size, num_beams=num_beams,
                                  max_new_tokens=max_new_tokens, show_progress=show_progress,
                                  num_workers=num_workers, by_page=by_page)
        run.results[spec.name] = result
        if out is not None:
            write_results(result, out if len(specs) == 1 else out / spec.name)
            if len(specs) > 1:  # after every task: a failure later keeps what is done
                write_summary(run.metrics, out)
        if on_result is not None:
            on_result(spec, result)
    if out is not None and len(specs) == 1:
        # a summary.json left by an earlier several-task eval here would make `report` show that one instead
        (out / "summary.json").unlink(missing_ok=True)
    return run
