"""``florence-kit tasks list|show``: what tasks exist, where they came from, what they render."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from florence_kit.cli.common import DatasetOption, TasksDirOption, console, err_console, user_errors
from florence_kit.common.errors import UserError

app = typer.Typer(help="List and inspect tasks (built in, task folders, plugins).", no_args_is_help=True)


def origin_label(origin: str) -> str:
    """'built-in' for shipped task files, else the file or plugin the task came from."""
    from florence_kit.tasks.registry import BUILTIN_DIR

    return "built-in" if origin.startswith(str(BUILTIN_DIR)) else origin


LIST_COLUMNS = ("name", "source", "metric", "prompt", "origin")


def _table(rows: list[tuple[str, ...]]) -> Table:
    """The terminal's table of tasks."""
    table = Table(title="florence-kit tasks")
    table.add_column("name", no_wrap=True)  # whole names, so they can be copied and grepped
    table.add_column("source", overflow="fold")
    table.add_column("metric", no_wrap=True)  # the task's metrics, the one it is ranked by first
    for col in ("prompt", "origin"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


@app.command("list")
@user_errors
def list_tasks(tasks_dir: TasksDirOption = None) -> None:
    """Show every task: name, data source, metrics, prompt and where it was defined.

    Piped (not a terminal), one tab-separated line per task after a header line, for grep and cut.

    Example: florence-kit tasks list --tasks-dir ./my_tasks
    Example: florence-kit tasks list | grep the_cauldron | cut -f1
    """
    from florence_kit.tasks.registry import collect_tasks, groups

    tasks, errors = collect_tasks(tasks_dir or [])
    rows = [(name, spec.dataset.path + (f" ({spec.dataset.name})" if spec.dataset.name else ""),
             ", ".join(spec.metrics), spec.prompt, origin_label(spec.origin)) for name, spec in sorted(tasks.items())]
    if console.is_terminal:
        console.print(_table(rows))
    else:  # piped: rich would fold sources and origins into 80-column pieces that grep cannot find
        for row in [LIST_COLUMNS, *rows]:
            typer.echo("\t".join(v.replace("\t", "\\t").replace("\n", "\\n") for v in row))
    for group, names in groups(tasks).items():
        console.print(f"group [bold]{group}[/]: {len(names)} tasks (train on all of them with `finetune {group}`)")
    for line in errors[:-1]:  # the tasks that loaded are listed above; each broken file or plugin is one line
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if errors:
        raise UserError(errors[-1])  # the last line, and exit 2


@app.command("show")
@user_errors
def show(
    name: Annotated[str, typer.Argument(help="Task name, e.g. docvqa.")],
    dataset: DatasetOption = None,
    example: Annotated[bool, typer.Option(help="Load the data and render one example prompt/target.")] = True,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Print a task's file, its resolved settings and one rendered example.

    Example: florence-kit tasks show docvqa --dataset ./my_docvqa
    """
    from pathlib import Path

    from florence_kit.tasks.registry import get_task

    spec = get_task(name, tasks_dir or [])
    console.rule(f"[bold]{spec.name}[/]  ({spec.origin})")
    if Path(spec.origin).is_file():
        console.print(Path(spec.origin).read_text(), highlight=False, markup=False)
    console.print(f"description: {spec.description}")
    console.print(f"dataset: {spec.dataset}", highlight=False)
    aliases = "".join(f" {k}<-{'|'.join(v)}" for k, v in spec.aliases.items())
    console.print(f"columns: image={spec.image_column} id={spec.id_column} references={spec.references}{aliases}",
                  markup=False, highlight=False)
    rows = [f"explode={spec.explode}" if spec.explode else "", f"multi_image={spec.multi_image}",
            f"row_map={spec.row_map}" if spec.row_map else "", f"group={spec.group}" if spec.group else ""]
    console.print("rows: " + " ".join(r for r in rows if r), markup=False, highlight=False)
    if spec.regions:  # region tasks: where boxes are read from and how they are written
        console.print("regions: " + " ".join(f"{k}={v}" for k, v in spec.regions.items()), markup=False,
                      highlight=False)
    console.print(f"metric: {', '.join(spec.metrics)}   generation: {spec.generation}")
    console.print(f"prompt template: {spec.prompt!r}   target template: {spec.target!r}", markup=False)
    if example:
        from florence_kit.common.errors import UserError
        from florence_kit.data.dataset import TaskDataset, cap_rows, load_split
        from florence_kit.tasks.region_block import UNIT_KINDS

        # the hub's copy is streamed: one row, not a whole download (examples per object: the first of 20 rows')
        n_rows = 20 if spec.regions and spec.regions["kind"] in UNIT_KINDS else 1
        try:
            rows = cap_rows(load_split(spec, dataset, spec.dataset.train_split, streaming=dataset is None), n_rows)
            examples = TaskDataset(rows, spec, with_target=False)
            if not len(examples):
                raise UserError(f"the first {n_rows} rows give no example (no object in them)")
            first = examples[0]
            prompt, target, refs = first.prompt, first.target, first.references
        except (UserError, StopIteration, IndexError) as exc:
            console.print(f"[yellow]no example rendered:[/] {exc}", highlight=False)
            return
        console.print(f"example image: {first.image.width}x{first.image.height} {first.image.mode}")
        console.print(f"example prompt: {prompt!r}", markup=False)
        console.print(f"example target: {target!r}   references: {refs}", markup=False)
