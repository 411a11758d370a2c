"""Generation: the task's generation settings and batched, right-padded generation.

The one place eval, predict, serve and evaluation during training get their decoding from.
Generation settings come from the task file, never from the checkpoint's own generation_config
(Microsoft's ships ``no_repeat_ngram_size=3`` and beam search, which mangle answers like "1 1 0").
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.common.geometry import decode_answers  # regions: <loc_*> survive even where they are "special"
from florence_kit.tasks.spec import TaskSpec

# per loaded model, the (asked, allowed) lengths already announced: one line per run, not one per batch
_CLAMPED: weakref.WeakKeyDictionary[Any, set[tuple[int, int]]] = weakref.WeakKeyDictionary()


def position_limit(model: Any) -> int:
    """The longest answer, in new tokens, and the longest encoder input the model's position tables allow.

    BART's learned tables hold ``max_position_embeddings`` positions for the encoder and for the decoder. The
    decoder's start token takes position 0 and the last token generated is never read back, so an answer of
    ``max_position_embeddings`` new tokens is the longest that fits; one more would index past the table.
    """
    return int(model.config.text_config.max_position_embeddings)


def generation_config_for(task: TaskSpec, model: Any, processor: Any, **overrides: Any) -> Any:
    """A fresh GenerationConfig from the task's settings (greedy unless the task says otherwise).

    ``overrides`` are what the user typed: a ``max_new_tokens`` past the model's position table is refused
    (a task's own setting is clamped instead, see :func:`generation_config`).
    """
    typed = {k: v for k, v in overrides.items() if v}
    limit = position_limit(model)
    if typed.get("max_new_tokens", 0) > limit:
        raise UserError(f"--max-new-tokens {typed['max_new_tokens']} is more than this model can generate: its "
                        f"decoder has {limit} positions; pass --max-new-tokens {limit} or less (or use a model "
                        "whose position table is longer)")
    return generation_config(model, processor, {**task.generation, **typed})


def generation_config(model: Any, processor: Any, settings: dict[str, Any]) -> Any:
    """Greedy decoding from the model's start token, with ``settings`` (max_new_tokens, num_beams, ...) on top:
    the one place eval, predict and serve get their generation settings from.

    A ``max_new_tokens`` longer than the decoder's position table is clamped to it, saying so once.
    """
    from transformers import GenerationConfig

    settings = {"max_new_tokens": 64, "num_beams": 1, **settings}
    limit = position_limit(model)
    if settings["max_new_tokens"] > limit:
        announced = _CLAMPED.setdefault(model, set())
        if (settings["max_new_tokens"], limit) not in announced:
            from rich.console import Console

            announced.add((settings["max_new_tokens"], limit))
            Console(stderr=True).print(f"[yellow]note:[/] answers are capped at {limit} new tokens (the task asks "
                                       f"for up to {settings['max_new_tokens']}; the model's decoder has {limit} "
                                       "positions)")
        settings["max_new_tokens"] = limit
    tok = processor.tokenizer
    saved = getattr(model, "generation_config", None)
    return GenerationConfig(
        do_sample=False,
        # properties of the checkpoint, not of decoding: a Microsoft-trained model (converted) starts its
        # answers with <s>, and the vocabulary padding a conversion adds must never be generated
        forced_bos_token_id=getattr(saved, "forced_bos_token_id", None),
        suppress_tokens=getattr(saved, "suppress_tokens", None),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=model.config.text_config.decoder_start_token_id,
        **settings,
    )


def encode(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> Any:
    """Processor inputs for one batch, padded on the RIGHT whatever the tokenizer's own setting.

    Florence-2's text model is an encoder-decoder BART: the encoder input is ``<image>*N <s> prompt </s>``
    with learned absolute positions, so right padding (masked by ``attention_mask``) leaves every real
    token at the position it has when the example is alone; left padding would shift them and change
    the answers. The decoder starts from ``decoder_start_token_id`` for every row, so it needs no padding.
    """
    return processor(
        images=list(images), text=list(prompts), return_tensors="pt", padding="longest", padding_side="right"
    )


def check_prompt_fits(model: Any, input_ids: Any) -> None:
    """Refuse, in one line, an encoder input (image tokens + prompt) longer than the encoder's position table."""
    limit = position_limit(model)
    if input_ids.shape[-1] > limit:
        raise UserError(f"a prompt is {input_ids.shape[-1]} tokens with the image's, more than the {limit} "
                        "positions this model's encoder has: shorten the question")


def generate_from_inputs(model: Any, processor: Any, inputs: Any, gen_config: Any) -> list[str]:
    """Answers for already-encoded inputs (see :func:`encode`), special tokens (but not ``<loc_*>``) removed."""
    import torch

    check_prompt_fits(model, inputs["input_ids"])
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen_config)
    return decode_answers(processor, out)


def generate(model: Any, processor: Any, images: Sequence[Any], prompts: Sequence[str], gen_config: Any) -> list[str]:
    """Answers for one batch of (image, prompt) pairs, special tokens removed."""
    return generate_from_inputs(model, processor, encode(processor, images, prompts), gen_config)


def encode_pages(processor: Any, images: Sequence[Any], prompts: Sequence[str], image_index: Sequence[int]) -> Any:
    """:func:`encode`'s inputs with each distinct image processed once: ``pixel_values`` holds the distinct images
    and ``image_index`` says which one each row shows (``input_ids`` and the mask equal :func:`encode`'s, tested)."""
    import torch
    from transformers import BatchFeature

    from florence_kit.data.prepared import token_layout

    text = processor.tokenizer.pad({"input_ids": token_layout(processor, prompts)}, padding="longest",
                                   padding_side="right", return_tensors="pt")
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    return BatchFeature({"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                         "pixel_values": pixels, "image_index": torch.tensor(list(image_index))})


def generate_pages(model: Any, processor: Any, inputs: Any, gen_config: Any) -> list[str]:
    """Answers for :func:`encode_pages` inputs: the vision tower runs once per distinct image, the BART encoder once
    per row, and ``generate`` starts from those encoder outputs (the answers of :func:`generate`, tested)."""
    import torch

    check_prompt_fits(model, inputs["input_ids"])
    inputs = inputs.to(model.device)
    native = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.inference_mode():
        features = native.model.get_image_features(inputs["pixel_values"].to(model.dtype)).pooler_output
        embeds = native.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == native.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features[inputs["image_index"]].to(embeds.dtype))
        encoded = native.model.language_model.encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        out = model.generate(encoder_outputs=encoded, attention_mask=inputs["attention_mask"],
                             generation_config=gen_config)
    return decode_answers(processor, out)


def prompt_lengths(processor: Any, prompts: Sequence[str]) -> list[int]:
    """Each prompt's token count as the processor expands it (image tokens are the same for every example)."""
    if not prompts:
        return []
    construct = getattr(processor, "_construct_prompts", None)
    texts = construct(list(prompts)) if construct else list(prompts)
    return [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def page_order(keys: Sequence[str], lengths: Sequence[int]) -> list[int]:
    """Indices grouped by page: pages in order of their longest prompt, a page's questions longest first.

    A batch then holds whole pages (DocVQA: about four questions each), so each page is decoded, resized and run
    through the vision tower once. Ties keep dataset order: the order is deterministic.
    """
    pages: dict[str, list[int]] = {}
    for index in sorted(range(len(keys)), key=lambda i: -lengths[i]):
        pages.setdefault(keys[index], []).append(index)
    return [index for page in pages.values() for index in page]
