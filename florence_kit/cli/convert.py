"""``florence-kit convert SRC OUT``: a Microsoft-format Florence-2 checkpoint or LoRA adapter → a native one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import OverwriteOption, console, user_errors


@user_errors
def convert(
    src: Annotated[str, typer.Argument(help="A Microsoft-format checkpoint or adapter folder, or a hub id.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the native checkpoint (or adapter) into.")],
    base: Annotated[
        str | None,
        typer.Option(help="Adapters: the native base to put it on (a converted folder or a florence-community id)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, float16 or bfloat16 (default: the dtype the weights were saved in).")
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Convert a Florence-2 made with Microsoft's remote code (trust_remote_code=True) to the native format.

    A full checkpoint becomes native safetensors + a native processor that load with from_pretrained and no
    remote code; a LoRA adapter trained on it becomes an adapter on the native base (--base DIR for a
    converted base; otherwise the florence-community twin of the base it names). The remote *.py files are
    never run; .bin weights are read with torch.load(weights_only=True). The result gives the original's
    outputs (logits within 1e-4 in fp32, the same greedy and beam answers). With --overwrite, a non-empty OUT is
    replaced only once the new one is complete.

    Example: florence-kit convert ./my-florence-ft ./my-florence-ft-native
    """
    from florence_kit.model.convert import convert as run

    report = run(src, out, base=base, dtype=dtype, overwrite=overwrite)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if report.kind == "checkpoint":
        console.print(f"[green]converted:[/] {src} → {out} ({len(report.mapped)} tensors, {report.dtype}, "
                      f"vocabulary {report.vocab_size}); use it with --model {out}", highlight=False)
    else:
        console.print(f"[green]converted adapter:[/] {src} → {out} ({len(report.mapped)} tensors); use it with "
                      f"--model {out}", highlight=False)
