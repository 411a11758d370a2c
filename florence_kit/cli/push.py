"""``florence-kit push RUN_DIR REPO``: upload a finished run (model or adapter, processor, card) to the hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import console, user_errors


@user_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="A `florence-kit finetune` output folder.")],
    repo: Annotated[str, typer.Argument(help="Hub repo id, owner/name (created if missing).")],
    private: Annotated[bool, typer.Option(help="Create the repo as private.")] = False,
) -> None:
    """Upload RUN_DIR's top-level files to REPO: weights (safetensors), processor files, README.md card,
    config.yaml and the training log (metrics.jsonl).

    Checkpoints and other sub-folders stay local, and so do pickles (.bin, .pt, .pth, .ckpt, .pkl).

    Example:

      florence-kit push runs/docvqa-frozen me/florence2-docvqa
    """
    from florence_kit.present.hub import check_can_push, files_to_push, push_run

    files_to_push(run_dir)  # a folder that is not a run fails before any network call
    check_can_push(repo)
    url = push_run(run_dir, repo, private=private)
    console.print(f"[green]pushed[/] {run_dir} to {url}")
