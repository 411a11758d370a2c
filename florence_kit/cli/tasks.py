"""``florence-kit tasks list|show``: what tasks exist, where they came from, what they render."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from florence_kit.cli.common import TasksDirOption, console, user_errors

app = typer.Typer(help="List and inspect tasks (built in, task folders, plugins).", no_args_is_help=True)


def origin_label(origin: str) -> str:
    """'built-in' for shipped task files, else the file or plugin the task came from."""
    from florence_kit.registry import BUILTIN_DIR

    return "built-in" if origin.startswith(str(BUILTIN_DIR)) else origin


@app.command("list")
@user_errors
def list_tasks(tasks_dir: TasksDirOption = None) -> None:
    """Show every task: name, data source, metric, prompt and where it was defined.

    Example: florence-kit tasks list --tasks-dir ./my_tasks
    """
    from florence_kit.registry import all_tasks

    table = Table(title="florence-kit tasks")
    for col in ("name", "source", "metric", "prompt", "origin"):
        table.add_column(col, overflow="fold")
    for name, spec in sorted(all_tasks(tasks_dir or []).items()):
        table.add_row(name, spec.dataset.path, spec.metric, spec.prompt, origin_label(spec.origin))
    console.print(table)


@app.command("show")
@user_errors
def show(
    name: Annotated[str, typer.Argument(help="Task name, e.g. docvqa.")],
    dataset: Annotated[
        str | None, typer.Option(help="Render the first training row of this dataset (default: the task's).")
    ] = None,
    example: Annotated[bool, typer.Option(help="Load the data and render one example prompt/target.")] = True,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Print a task's file, its resolved settings and one rendered example.

    Example: florence-kit tasks show docvqa --dataset ./my_docvqa
    """
    from pathlib import Path

    from florence_kit.registry import get_task

    spec = get_task(name, tasks_dir or [])
    console.rule(f"[bold]{spec.name}[/]  ({spec.origin})")
    if Path(spec.origin).is_file():
        console.print(Path(spec.origin).read_text(), highlight=False, markup=False)
    console.print(f"description: {spec.description}")
    console.print(f"dataset: {spec.dataset}", highlight=False)
    console.print(f"columns: image={spec.image_column} id={spec.id_column} references={spec.references}")
    console.print(f"metric: {spec.metric}   generation: {spec.generation}")
    console.print(f"prompt template: {spec.prompt!r}   target template: {spec.target!r}", markup=False)
    if example:
        from florence_kit.data import load_split, render_texts
        from florence_kit.errors import UserError

        try:  # the hub's copy is streamed: one row, not a whole download
            rows = load_split(spec, dataset, spec.dataset.train_split, streaming=dataset is None)
            prompt, target, refs = render_texts(spec, next(iter(rows)), 0)
        except (UserError, StopIteration) as exc:
            console.print(f"[yellow]no example rendered:[/] {exc}", highlight=False)
            return
        console.print(f"example prompt: {prompt!r}", markup=False)
        console.print(f"example target: {target!r}   references: {refs}", markup=False)
