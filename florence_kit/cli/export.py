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
    from florence_kit.common.errors import UserError
    from florence_kit.model.adapters import load_adapter_model
    from florence_kit.model.checkpoint_io import ADAPTER_CONFIG, save_checkpoint
    from florence_kit.train.config import check_output_dir

    if not (run_dir / ADAPTER_CONFIG).is_file():
        if (run_dir / "config.json").is_file():
            raise UserError(f"'{run_dir}' is already a plain checkpoint (a full/frozen-encoder run): nothing to merge")
        raise UserError(f"'{run_dir}' is not a lora/qlora run folder: no {ADAPTER_CONFIG} in it")
    if merge.resolve() == run_dir.resolve():
        raise UserError("--merge must be a different folder from RUN_DIR (the adapter would be overwritten)")
    check_output_dir(merge, overwrite)
    model, processor = load_adapter_model(run_dir, merge=True)
    save_checkpoint(model, processor, merge)
    console.print(f"[green]merged:[/] {run_dir} → {merge} (loads with from_pretrained)")
