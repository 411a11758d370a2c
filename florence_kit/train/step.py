"""One optimizer step's parts: the loss of a batch (frozen tower under no_grad), AdamW, the warmup schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.data.collate import IGNORE_INDEX


def forward_loss(
    model: Any, batch: dict[str, Any], frozen_vision: bool, num_items: Any = None, feature_cache: Any = None
) -> Any:
    """Loss of one batch. With the vision tower frozen, it runs under ``no_grad``: no activations kept.

    The objective is Microsoft's: the decoder reads the labels shifted right behind the decoder start token
    and the cross-entropy scores every label that is not -100, unshifted (:func:`token_cross_entropy`).
    It is computed here from the logits rather than taken from ``model(...).loss``, whose definition
    changed between transformers releases (5.0-5.12 shift the labels a second time).
    ``num_items``: the loss is summed over target tokens and divided by this count (the whole global
    batch's) instead of averaged over this batch's own tokens.
    ``feature_cache`` (a :class:`florence_kit.train.feature_cache.VisionFeatureCache`) serves the frozen tower's
    output for images seen before, so DaViT runs once per distinct image.
    """
    import torch

    from florence_kit.model.modes import unwrap

    labels = batch["labels"]
    native = unwrap(getattr(model, "module", model))
    decoder_input_ids = decoder_inputs(labels, native.config.text_config)
    if not frozen_vision:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return token_cross_entropy(logits, labels, num_items)
    inner = native.model
    if feature_cache is not None:  # --- trainspeed: vision-feature cache ---
        features = feature_cache.features(inner.vision_tower, batch["pixel_values"])
    else:
        with torch.no_grad():
            features = inner.vision_tower(batch["pixel_values"]).last_hidden_state
    image_features = inner.multi_modal_projector(features)
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask = (batch["input_ids"] == inner.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_features.to(embeds.dtype))
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], decoder_input_ids=decoder_input_ids,
                   use_cache=False).logits
    return token_cross_entropy(logits, labels, num_items)


def decoder_inputs(labels: Any, text_config: Any) -> Any:
    """The decoder's input: the labels shifted one place right behind the start token, -100 read as padding."""
    import torch

    shifted = torch.full_like(labels, text_config.decoder_start_token_id)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, text_config.pad_token_id)


def token_cross_entropy(logits: Any, labels: Any, num_items: Any = None) -> Any:
    """Cross-entropy of each position's logits against the label at the SAME position, -100 skipped.

    Summed in float32 and divided by ``num_items`` (the target tokens of the whole global batch) or, without
    it, by this batch's own count: the mean over target tokens either way.
    """
    import torch.nn.functional as F

    total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items if num_items is not None else (labels != IGNORE_INDEX).sum()
    return total / count


def make_optimizer(model: Any, lr: float, weight_decay: float, optim: str = "adamw") -> Any:
    """AdamW over trainable parameters only (frozen ones get no optimizer state); no decay on norms/biases.

    ``adamw8bit``/``paged-adamw8bit``: bitsandbytes' 8-bit AdamW (see florence_kit/model/adapters.py).
    """
    import torch

    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if optim != "adamw":
        from florence_kit.model.adapters import OPTIMIZERS, bnb_optimizer

        if optim not in OPTIMIZERS:
            raise UserError(f"--optim must be one of {', '.join(OPTIMIZERS)}, got '{optim}'")
        return bnb_optimizer(groups, lr, optim)
    # fused: one kernel over all tensors, on CPU as on CUDA (a base-sized LM's step on a 2-core CPU: 0.15 s,
    # against 1.3 s for the foreach update torch picks by default); foreach where fused does not run
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def warmup_schedule(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup, then linear or cosine decay to 0 (or constant).

    Written out (ten lines) instead of importing transformers' ``get_scheduler``, whose import chain
    (trainer utilities, peft, bitsandbytes) costs seconds on every run.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return factor
