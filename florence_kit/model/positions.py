"""Longer outputs: grow Florence-2's learned position tables past their 1,024 positions.

Florence-2's text model is BART: the encoder and the decoder each add a learned absolute position embedding,
a table of ``max_position_embeddings`` rows plus an offset of 2 rows that no position reads (BART's layout).
An answer longer than the table cannot be trained or generated. Growing the tables to ``N`` rows (+ the
offset) and setting ``text_config.max_position_embeddings = N`` gives a checkpoint that transformers builds
with tables of the same size, so it reloads with ``Florence2ForConditionalGeneration.from_pretrained`` alone.

The config holds one ``max_position_embeddings`` for both tables, so both grow. The new rows start from the
existing ones:

- ``copy``: the first ``old`` rows are kept as they are and the table is tiled after them (position
  ``old + i`` starts as position ``i``). Everything the model did within ``old`` positions is unchanged.
- ``interpolate``: the decoder's table is resampled (linearly) to ``N`` rows, so position ``p`` starts as the
  old table at ``p * (old - 1) / (N - 1)``; neighbouring positions stay alike, but every position past the first
  moves and the model must re-learn where it is. The encoder (image tokens + prompt, which still fit) is tiled
  either way, so that what it reads is unchanged.
"""

from __future__ import annotations

from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.model.modes import mode_row

INITS = ("copy", "interpolate")
DEFAULT_INIT = "copy"
MAX_LENGTH = 65536  # far past any answer; a typo such as 20480000 is refused instead of allocating gigabytes


def text_model(model: Any) -> Any:
    """The BART encoder-decoder inside a Florence-2 model (plain, DDP-unwrapped or LoRA-wrapped)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # a peft model
        inner = inner.get_base_model()
    return inner.model.language_model


def position_tables(model: Any) -> dict[str, Any]:
    """``{"encoder": embedding, "decoder": embedding}``: the two learned position tables."""
    text = text_model(model)
    return {"encoder": text.encoder.embed_positions, "decoder": text.decoder.embed_positions}


def grown_rows(rows: Any, length: int, init: str) -> Any:
    """``rows`` (``old`` x d, positions 0..old-1) as a ``length`` x d table initialised by ``init``."""
    import torch

    old = rows.shape[0]
    if init == "copy":
        return rows[torch.arange(length, device=rows.device) % old]
    if init == "interpolate":
        stretched = torch.nn.functional.interpolate(rows.detach().float().t()[None], size=length, mode="linear",
                                                    align_corners=True)
        return stretched[0].t().to(rows.dtype)
    raise UserError(f"position init must be one of {', '.join(INITS)}, got '{init}'")


def grow_positions(model: Any, length: int, init: str = DEFAULT_INIT, processor: Any = None) -> bool:
    """Grow both position tables of ``model`` (in place) to ``length`` positions; False when they already hold as many.

    Also sets ``text_config.max_position_embeddings`` (so the preflight, :func:`position_limit` and
    ``from_pretrained`` see the new length), moves a generation ``max_length`` that was the old table's limit,
    and lifts ``processor``'s tokenizer ``model_max_length`` (otherwise it warns about every long target).
    """
    import torch

    if init not in INITS:
        raise UserError(f"position init must be one of {', '.join(INITS)}, got '{init}'")
    if not 1 <= length <= MAX_LENGTH:
        raise UserError(f"--max-target-length must be between 1 and {MAX_LENGTH}, got {length}")
    config = text_model(model).config
    old = int(config.max_position_embeddings)
    if length <= old:
        return False
    for name, table in position_tables(model).items():
        offset = int(getattr(table, "offset", 2))
        weight = table.weight
        with torch.no_grad():
            body = grown_rows(weight[offset:offset + old], length, "copy" if name == "encoder" else init)
            new = torch.cat([weight[:offset], body.to(weight.dtype)], dim=0).contiguous()
        table.weight = torch.nn.Parameter(new, requires_grad=weight.requires_grad)
        table.num_embeddings = new.shape[0]
    set_length(model, length, old)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "model_max_length", 0) < length:
        tokenizer.model_max_length = length
    return True


def set_length(model: Any, length: int, old: int) -> None:
    """``max_position_embeddings`` everywhere the model keeps it, and a generation ``max_length`` tied to it."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    for config in {id(c): c for c in (inner.config.text_config, text_model(model).config)}.values():
        config.max_position_embeddings = length
    generation = getattr(inner, "generation_config", None)
    if generation is not None and getattr(generation, "max_length", None) in (old, old + 1):
        generation.max_length = length + 1  # the start token + ``length`` new tokens


def grow_for_training(model: Any, processor: Any, length: int | None, mode: str,
                      init: str = DEFAULT_INIT) -> str | None:
    """``finetune --max-target-length``: the tables grown before the preflight; the line to print, if any.

    An adapter run (lora, qlora) saves only its adapter on the base it names, so grown tables would be lost:
    it is refused unless the base already has ``length`` positions.
    """
    if length is None:
        return None
    if not 1 <= length <= MAX_LENGTH:
        raise UserError(f"--max-target-length must be between 1 and {MAX_LENGTH}, got {length}")
    old = int(text_model(model).config.max_position_embeddings)
    if length <= old:
        return f"positions: the model already has {old} (--max-target-length {length} needs no growing)"
    if mode_row(mode).adapters:
        raise UserError(f"--max-target-length {length} grows the position tables past the model's {old}, which an "
                        f"adapter (--mode {mode}) does not save: use --mode full or frozen-encoder, or a base "
                        "checkpoint that already has the positions")
    grow_positions(model, length, init, processor)
    return f"positions: encoder and decoder tables grown from {old} to {length} (new rows: {init})"
