"""Synthetic dense text pages whose target is the whole page's text in reading order (the ``ocr-page`` task).

Each page is numbered lines of words drawn from a small fixed word list ("017 amber field north ..."), rendered
top to bottom with Pillow's embedded font, so it exists offline and renders identically everywhere. The text is
built line by line until it holds the page's drawn length in target tokens (1,500-3,000 by default, counted with
the tiny model's byte-level tokenizer unless another ``count_tokens`` is given): every page is longer than the
1,024 positions of a stock Florence-2 decoder. The line numbers count up and the words come from the list, so a
model can learn the page's text model at every position; the same distribution fills the head and the tail of
each page, which is what a comparison of the two needs.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

WORDS = (
    "amber", "basin", "cedar", "delta", "ember", "field", "grove", "harbor", "island", "jasper", "kettle", "lantern",
    "meadow", "north", "orchard", "pepper", "quarry", "river", "saddle", "timber", "upland", "valley", "willow",
    "yonder", "zephyr", "anchor", "bridge", "canyon", "dune", "estuary", "fjord", "glacier", "hollow", "inlet",
    "juniper", "knoll", "ledge", "marsh", "nectar", "oasis", "prairie", "quill", "ridge", "summit", "tundra",
    "umber", "vista", "wharf",
)
TARGET_TOKENS = (1500, 3000)
PAGE_SIDE = 768
FONT_SIZE = 9
LINE_HEIGHT = 12
MARGIN = 8


def byte_tokens(text: str) -> int:
    """Tokens of ``text`` for the tiny model's tokenizer: one per UTF-8 byte, plus <s> and </s>."""
    return len(text.encode("utf-8")) + 2


def page_text(rng: random.Random, n_tokens: int, count_tokens: Callable[[str], int] = byte_tokens,
              words_per_line: tuple[int, int] = (12, 16)) -> str:
    """Numbered lines of words until the text holds at least ``n_tokens`` tokens (whole lines: at most one more)."""
    lines: list[str] = []
    number = 1
    while True:
        words = rng.choices(WORDS, k=rng.randint(*words_per_line))
        lines.append(f"{number:03d} " + " ".join(words))
        number += 1
        if count_tokens("\n".join(lines)) >= n_tokens:
            return "\n".join(lines)


def render_page(text: str, side: int = PAGE_SIDE) -> Any:
    """The page: each line of ``text`` on its own row, top to bottom (the reading order of the target)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (side, side), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    lines = text.split("\n")
    pitch = max(LINE_HEIGHT, min(2 * LINE_HEIGHT, (side - 2 * MARGIN) // max(1, len(lines))))  # fill the page
    for row, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + row * pitch), line, fill="black", font=font)
    return image


def long_pages(n: int, seed: int = 0, target_tokens: tuple[int, int] = TARGET_TOKENS,
               count_tokens: Callable[[str], int] = byte_tokens, side: int = PAGE_SIDE) -> Any:
    """``n`` pages as a ``datasets.Dataset`` with ``image`` and ``text`` (the page's text in reading order).

    The drawn length leaves room for the last whole line, so every page ends within ``target_tokens``.
    """
    import datasets

    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"image": [], "text": []}
    longest_line = 4 + 17 * max(len(w) for w in WORDS)
    for _ in range(n):
        text = page_text(rng, rng.randint(target_tokens[0], max(target_tokens[0], target_tokens[1] - longest_line)),
                         count_tokens)
        buffer = io.BytesIO()
        render_page(text, side).save(buffer, format="PNG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["text"].append(text)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def page_splits(n_train: int = 16, n_eval: int = 4, seed: int = 0, **kwargs: Any) -> Any:
    """``DatasetDict(train, validation)`` of long pages; the splits use different seeds (no page is in both)."""
    import datasets

    return datasets.DatasetDict({"train": long_pages(n_train, seed=2 * seed, **kwargs),
                                 "validation": long_pages(n_eval, seed=2 * seed + 1, **kwargs)})


def main(argv: list[str] | None = None) -> None:
    """``python -m florence_kit.demo.synthetic_pages OUT [N_TRAIN N_EVAL]``: a save_to_disk folder for ``ocr-page``."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m florence_kit.demo.synthetic_pages OUT [N_TRAIN N_EVAL]")
    n_train, n_eval = (int(args[1]), int(args[2])) if len(args) > 2 else (16, 4)
    page_splits(n_train, n_eval).save_to_disk(args[0])
    print(f"{n_train} + {n_eval} long pages written to {args[0]}")


if __name__ == "__main__":
    main()
