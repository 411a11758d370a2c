"""``florence-kit demo``: the whole job offline on CPU in a few minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from florence_kit.cli.common import QuietOption, SeedOption, console, user_errors


@user_errors
def demo(
    output_dir: Annotated[Path, typer.Option(help="Where the demo's model, data and results go.")] = Path(
        "runs/demo"
    ),
    seed: SeedOption = 0,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the measured recipe's).")] = None,
    train_docs: Annotated[int | None, typer.Option(help="Rendered training pages (default: the recipe's).")] = None,
    eval_docs: Annotated[int | None, typer.Option(help="Rendered held-out pages (default: the recipe's).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Build a tiny random Florence-2, render DocVQA-style pages, fine-tune, and show held-out ANLS.

    Everything is offline and on CPU. Example: florence-kit demo --seed 1
    """
    from florence_kit.demo.run_demo import DemoRecipe, run_demo

    recipe = DemoRecipe()
    recipe.steps = steps or recipe.steps
    recipe.n_train_docs = train_docs or recipe.n_train_docs
    recipe.n_eval_docs = eval_docs or recipe.n_eval_docs
    summary = run_demo(output_dir, seed, recipe, quiet, print_fn=console.print)
    n = summary["held_out_questions"]
    table = Table(title=f"held-out documents ({n} questions, values never seen in training)")
    for col in ("", "before fine-tuning", "after fine-tuning", "answer prior"):
        table.add_column(col, justify="right")
    for name in ("anls", "exact_match"):
        table.add_row(
            name.upper() if name == "anls" else "exact match",
            f"{summary[name]['before']:.3f}", f"{summary[name]['after']:.3f}", f"{summary['answer_prior'][name]:.3f}",
        )
    console.print(table)
    console.print(
        f"fine-tuned {summary['train_steps']} steps in {summary['train_seconds']}s; total {summary['total_seconds']}s. "
        f"Files: {output_dir}/ (eval-before/, eval-after/, finetuned/, demo.json)"
    )
