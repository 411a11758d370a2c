"""``florence-kit serve``: try a checkpoint in the browser (Gradio, optional extra ``ui``), or serve it to programs
as an OpenAI-compatible HTTP API (``--api``)."""

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
    port: Annotated[int | None, typer.Option(help="Port to listen on; default: 7860 for the page, 8000 with --api.",
                                             show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network).")] = "127.0.0.1",
    attn: AttnOption = Attn.auto,
    tasks_dir: TasksDirOption = None,
    api: Annotated[bool, typer.Option("--api", help="Serve an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                      "/v1/florence/predict) instead of the page; see docs/serve.md.")] = False,
    batch_window_ms: Annotated[float, typer.Option(help="--api: how long a batch waits for more requests after "
                                                   "its first (0: only what queued while the model was busy).")] = 10.0,
    max_batch: Annotated[int, typer.Option(help="--api: requests generated together at most (1: batching off).")] = 16,
    api_key: Annotated[str | None, typer.Option(envvar="FLORENCE_KIT_API_KEY", help="--api: refuse requests without "
                                                "'Authorization: Bearer KEY' (401).", show_default=False)] = None,
    allow_local_files: Annotated[bool, typer.Option("--allow-local-files", help="--api: accept an image given as a "
                                                    "local path (default: data: URLs only).")] = False,
    max_body_mb: Annotated[float, typer.Option(help="--api: largest request body, in MB (413 beyond).")] = 20.0,
    max_image_pixels: Annotated[int, typer.Option(help="--api: largest image, in pixels (decompression "
                                                  "bombs are refused before decoding).")] = 40_000_000,
) -> None:
    """Start a local web page: upload a document image, pick a task, type a question, read the answer
    (boxes are drawn for tasks that return regions). Needs: pip install 'florence-kit\\[ui]'. With --api: an
    OpenAI-compatible HTTP API with dynamic batching instead (SIGTERM finishes the requests in flight).

    Example: florence-kit serve runs/demo/finetuned --task docvqa --port 7860

    Example: florence-kit serve runs/demo/finetuned --api --port 8000 --max-batch 16
    """
    from florence_kit.model.onnx_runtime import export_tasks_dirs

    tasks_dirs = [*(Path(p) for p in tasks_dir or []), *export_tasks_dirs(model)]
    if api:
        from florence_kit.present.api import serve_api

        serve_api(model, task or model_task(model, tasks_dirs), host, 8000 if port is None else port, tasks_dirs,
                  print_fn=console.print, attn=attn.value, batch_window_ms=batch_window_ms, max_batch=max_batch,
                  api_key=api_key, allow_local_files=allow_local_files, max_body_mb=max_body_mb,
                  max_image_pixels=max_image_pixels)
        return
    from florence_kit.present.serve import serve as run_server

    run_server(model, task or model_task(model, tasks_dirs), host, 7860 if port is None else port, tasks_dirs,
               print_fn=console.print, attn=attn.value)
