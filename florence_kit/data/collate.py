"""Examples → model batches: the processor call, label masking, and the length preflight.

Labels are the tokenised targets with every padding position set to -100, so the loss never
trains on padding (the reference fine-tuning code does). Positions are limited (1024 for
Florence-2): the preflight counts what would not fit *before* training starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.data.dataset import Example

IGNORE_INDEX = -100
TOO_LONG_CHOICES = ("drop", "truncate", "error")


def max_positions(model_config: Any) -> int:
    """Positions of the BART encoder/decoder (1024 for Florence-2)."""
    return int(model_config.text_config.max_position_embeddings)


def _expanded_prompt(processor: Any, prompt: str) -> str:
    """The text the processor really tokenises (Florence-2 expands task tokens such as <OCR>)."""
    construct = getattr(processor, "_construct_prompts", None)
    return construct([prompt])[0] if construct else prompt


def encoder_length(processor: Any, prompt: str) -> int:
    """Image tokens + <s> + prompt + </s>, as the processor lays them out."""
    ids = processor.tokenizer(_expanded_prompt(processor, prompt), add_special_tokens=False)["input_ids"]
    return processor.num_image_tokens + len(ids) + 2


def target_length(processor: Any, target: str) -> int:
    return len(processor.tokenizer(target)["input_ids"])


@dataclass
class PreflightReport:
    """What the length preflight found: kept row indices and the rows that were too long."""

    keep: list[int]
    too_long: list[int] = field(default_factory=list)
    limit: int = 0
    longest: int = 0


def preflight(
    rows: Iterable[tuple[int, str, str | None]], processor: Any, limit: int, policy: str = "drop"
) -> PreflightReport:
    """Find rows whose encoder input or target exceeds ``limit`` and apply the ``--too-long`` policy."""
    if policy not in TOO_LONG_CHOICES:
        raise UserError(f"--too-long must be one of {', '.join(TOO_LONG_CHOICES)}, got '{policy}'")
    keep, too_long, longest = [], [], 0
    for index, prompt, target in rows:
        length = max(encoder_length(processor, prompt), target_length(processor, target) if target else 0)
        longest = max(longest, length)
        (too_long if length > limit else keep).append(index)
    if too_long and policy == "error":
        raise UserError(
            f"{len(too_long)} example(s) exceed the model's {limit} positions (first: row {too_long[0]}, "
            f"longest {longest}); use --too-long drop or --too-long truncate"
        )
    if policy == "truncate":
        keep = sorted(keep + too_long)
    return PreflightReport(keep=keep, too_long=too_long, limit=limit, longest=longest)


class Collator:
    """Turn a list of examples into ``input_ids, attention_mask, pixel_values`` (+ ``labels``)."""

    def __init__(self, processor: Any, *, max_length: int, with_labels: bool = True, truncate: bool = False):
        self.processor = processor
        self.max_length = max_length
        self.with_labels = with_labels
        self.truncate = truncate

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        limits = {"truncation": True, "max_length": self.max_length} if self.truncate else {}
        batch = self.processor(
            images=[ex.image for ex in examples],
            text=[ex.prompt for ex in examples],
            return_tensors="pt",
            padding="longest",
            **limits,
        )
        batch = dict(batch)
        if self.with_labels:
            batch["labels"] = self.labels([ex.target or "" for ex in examples], limits)
        return batch

    def labels(self, targets: list[str], limits: dict[str, Any] | None = None) -> Any:
        """Tokenised targets with padding positions masked to -100."""
        enc = self.processor.tokenizer(
            targets, padding="longest", return_tensors="pt", return_token_type_ids=False, **(limits or {})
        )
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = IGNORE_INDEX
        return labels
