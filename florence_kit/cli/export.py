"""``florence-kit export RUN_DIR --merge OUT``: a LoRA/QLoRA run folder → a plain merged checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import console, user_errors


@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A lora/qlora run folder (adapter_config.json + adapter).")],
    merge: Annotated[Path, typer.Option("--merge", help="Write the base with the adapter merged in to this folder.")],
    overwrite: Annotated[bool, typer.Option(help="Allow writing into a non-empty output folder.")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a plain checkpoint (safetensors + processor).

    The result loads with Florence2ForConditionalGeneration.from_pretrained and needs neither peft nor
    bitsandbytes. A qlora adapter is merged into the base loaded in full precision.

    Example: florence-kit export runs/lora --merge runs/lora-merged
    """
    from florence_kit.present.export import merge_adapter

    merge_adapter(run_dir, merge, overwrite)
    console.print(f"[green]merged:[/] {run_dir} → {merge} (loads with from_pretrained)")
