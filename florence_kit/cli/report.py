"""``florence-kit report``: one self-contained HTML page for a run or an evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import console, user_errors


@user_errors
def report(
    source: Annotated[Path, typer.Argument(help="A run folder, an eval folder, or the demo's folder.")],
    output: Annotated[Path | None, typer.Option(help="A .html file, or a folder (default: SOURCE).")] = None,
    max_examples: Annotated[int, typer.Option(help="List at most this many examples (the lowest-scoring).")] = 500,
) -> None:
    """Write report.html: metrics (before/after when both exist), loss / learning-rate / eval curves, and a
    sortable table of examples, worst first. Images and plots are embedded: the file opens offline.

    Example: florence-kit report runs/demo
    """
    from florence_kit.present.report import write_report

    out = write_report(source, output, max_examples)
    console.print(f"report: {out}")
