"""``florence-kit make-tiny DIR``: a tiny random Florence-2 that loads like any checkpoint, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import OverwriteOption, SeedOption, console, user_errors


@user_errors
def make_tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model + processor into.")],
    seed: SeedOption = 0,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    overwrite: OverwriteOption = False,
) -> None:
    """Write a tiny random Florence-2 (tokenizer built locally) for offline tests and demos.

    Example: florence-kit make-tiny ./tiny && florence-kit eval docvqa --model ./tiny --dataset ./data
    """
    from florence_kit.model.tiny import save_tiny
    from florence_kit.train.config import check_output_dir

    check_output_dir(out_dir, overwrite)
    save_tiny(out_dir, seed=seed, image_size=image_size)
    console.print(f"tiny Florence-2 written to {out_dir}")
