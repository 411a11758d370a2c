"""The ``florence-kit`` command: one Typer app, one module per command group, no logic of its own.

Heavy libraries (torch, transformers) are imported inside the commands, so `tasks list` answers at once.
"""

from __future__ import annotations

import typer

from florence_kit.cli import convert, demo, eval_predict, export, finetune, model, plan, push, report, serve, tasks

app = typer.Typer(
    name="florence-kit",
    help="Fine-tune and evaluate Florence-2 on new tasks.\n\nExample: florence-kit demo",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
app.add_typer(tasks.app, name="tasks")
app.command("finetune")(finetune.finetune)
app.command("eval")(eval_predict.eval_)
app.command("score")(eval_predict.score)
app.command("predict")(eval_predict.predict)
app.command("make-tiny")(model.make_tiny)
app.command("demo")(demo.demo)
app.command("export")(export.export)
app.command("convert")(convert.convert)
app.command("push")(push.push)
app.command("report")(report.report)
app.command("serve")(serve.serve)
app.command("plan")(plan.plan)


def main() -> None:
    app()
