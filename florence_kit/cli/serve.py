"""``florence-kit serve``: try a checkpoint in the browser (Gradio, optional extra ``ui``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import (
    MODEL_HELP,
    Attn,
    AttnOption,
    TaskOption,
    TasksDirOption,
    console,
    model_task,
    user_errors,
)


@user_errors
def serve(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    task: TaskOption = None,
    port: Annotated[int, typer.Option(help="Port of the local web page.")] = 7860,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    attn: AttnOption = Attn.auto,
    tasks_dir: TasksDirOption = None,
) -> None:
    """Start a local web page: upload a document image, pick a task, type a question, read the answer
    (boxes are drawn for tasks that return regions). Needs: pip install 'florence-kit\\[ui]'.

    Example: florence-kit serve runs/demo/finetuned --task docvqa --port 7860
    """
    from florence_kit.model.onnx_runtime import export_tasks_dirs
    from florence_kit.present.serve import serve as run_server

    tasks_dirs = [*(Path(p) for p in tasks_dir or []), *export_tasks_dirs(model)]
    run_server(model, task or model_task(model, tasks_dirs), host, port, tasks_dirs, print_fn=console.print,
               attn=attn.value)
