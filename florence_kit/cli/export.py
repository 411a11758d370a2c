"""``florence-kit export``: a LoRA/QLoRA run merged into a plain checkpoint (``--merge``), or any run or
checkpoint as ONNX graphs for onnxruntime and Transformers.js (``--onnx``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from florence_kit.cli.common import OverwriteOption, console, user_errors


@user_errors
def export(
    source: Annotated[str, typer.Argument(
        metavar="RUN_OR_MODEL",
        help="--merge: a lora/qlora run folder. --onnx: any run or checkpoint folder or hub id (lora/qlora runs "
             "are merged first).")],
    merge: Annotated[Path | None, typer.Option(
        "--merge", help="Write the base with the adapter merged in to this folder.")] = None,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="Write ONNX graphs in Transformers.js' layout (onnx/*.onnx + config, tokenizer, processor "
                       "files) to this new folder; predict/eval/serve --model accept it (needs florence-kit[onnx]).")
    ] = None,
    quantize: Annotated[str, typer.Option(
        help="--onnx: also write int8 (onnxruntime dynamic quantisation, *_int8.onnx) or fp16 (*_fp16.onnx) graphs "
             "beside the fp32 ones (none | int8 | fp16); florence-kit then runs that variant.")] = "none",
    opset: Annotated[int, typer.Option(help="--onnx: ONNX opset version (17 or more).")] = 18,
    overwrite: OverwriteOption = False,
) -> None:
    """Merge a LoRA adapter into its base model, or export a model to ONNX.

    --merge saves a plain checkpoint (safetensors + processor) that loads with from_pretrained and needs neither
    peft nor bitsandbytes; a qlora adapter is merged into the base loaded in full precision; --overwrite lets it
    write into a non-empty folder (--onnx never writes over files).

    --onnx writes onnx/vision_encoder.onnx, embed_tokens.onnx, encoder_model.onnx and decoder_model_merged.onnx
    (with the key/value cache), checks their logits against PyTorch (within 1e-4) and moves the folder in only
    when everything is written. Transformers.js loads it with Florence2ForConditionalGeneration.from_pretrained.

    Examples:

      florence-kit export runs/lora --merge runs/lora-merged

      florence-kit export runs/finetune --onnx runs/finetune-onnx --quantize int8
    """
    from florence_kit.common.errors import UserError

    if (merge is None) == (onnx is None):
        raise UserError("pass one of --merge or --onnx (e.g. florence-kit export RUN --onnx OUT)")
    if onnx is not None:
        from florence_kit.present.onnx_export import export_onnx

        info = export_onnx(source, onnx, quantize=quantize, opset=opset, print_fn=console.print)
        mb = sum(info["files"].values()) / 1e6
        console.print(f"[green]exported:[/] {source} → {onnx} ({', '.join(info['variants'])}; {mb:.1f} MB of graphs; "
                      f"logits within {info['max_abs_logit_diff']:.1e} of PyTorch)")
        return
    from florence_kit.present.export import merge_adapter

    merge_adapter(Path(source), merge, overwrite)
    console.print(f"[green]merged:[/] {source} → {merge} (loads with from_pretrained)")
