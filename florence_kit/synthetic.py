"""Synthetic documents rendered in the exact public DocVQA schema (HuggingFaceM4/DocumentVQA).

The demo and the tests need a DocVQA-shaped dataset that exists offline, renders identically everywhere
and can only be solved by *reading* the page.  Every document is a small form ("Total: 42", "Tax: 17", ...)
drawn with Pillow's embedded font (``ImageFont.load_default(size=...)``, bundled with Pillow, so no system
fonts are involved); each field gives one question, as DocVQA has several questions per page.  With
``heldout=True`` the values come from a fixed subset of numbers that never appears in non-held-out
documents, so a model that memorises answers (or the answer prior) scores zero there: only reading counts.
"""

from __future__ import annotations

import io
import random
from typing import Any

import datasets
from PIL import Image, ImageDraw, ImageFont

DOCVQA_FEATURES = datasets.Features(
    {
        "questionId": datasets.Value("int32"),
        "question": datasets.Value("string"),
        "question_types": datasets.Sequence(datasets.Value("string")),
        "image": datasets.Image(),
        "docId": datasets.Value("int32"),
        "ucsf_document_id": datasets.Value("string"),
        "ucsf_document_page_no": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
    }
)

# (label printed on the page, question asked about it).  Order = row order of the fixed layout.
FIELDS: tuple[tuple[str, str], ...] = (
    ("Total", "What is the total?"),
    ("Tax", "What is the tax?"),
    ("Items", "How many items?"),
    ("Room", "What is the room number?"),
    ("Code", "What is the code?"),
)
TITLES = ("INVOICE", "RECEIPT", "ORDER", "FORM")

# The held-out/train split of values is fixed (independent of the rendering seed) so that every seed's
# validation set uses values its training set never contains.
SPLIT_SEED = 20240229
DEFAULT_KNOBS: dict[str, Any] = {
    "n_fields": 1,  # fields (= questions) per page, taken from FIELDS in order
    "value_digits": 2,  # values are numbers with exactly this many digits
    "heldout_frac": 0.2,  # fraction of all values reserved for held-out documents
    "font_size": 16,  # px, Pillow's embedded font
    "shuffle_rows": False,  # shuffle the order of the fields on the page
    "jitter": 0,  # max random x/y offset of the whole block, px
    "title": True,  # print a title line ("INVOICE", ...) above the fields
    "doc_id_offset": None,  # docId of the first document (default: derived from the split)
}


def value_split(value_digits: int = 2, heldout_frac: float = 0.2) -> tuple[list[str], list[str]]:
    """Return (train_values, heldout_values): a fixed random partition of all ``value_digits``-digit numbers.

    A random (not arithmetic) partition keeps every digit at every position in both halves, so reading
    transfers from train to held-out values.
    """
    lo, hi = 10 ** (value_digits - 1), 10**value_digits
    values = [str(v) for v in range(lo, hi)]
    random.Random(SPLIT_SEED + value_digits).shuffle(values)
    n_held = max(1, round(len(values) * heldout_frac))
    return sorted(values[n_held:]), sorted(values[:n_held])


def _render_page(
    rows: list[tuple[str, str]], rng: random.Random, image_size: int, knobs: dict[str, Any]
) -> Image.Image:
    """Draw one page; coordinates are in a 128 px design space scaled to ``image_size``."""
    scale = image_size / 128
    font_size = max(6, round(knobs["font_size"] * scale))
    font = ImageFont.load_default(size=font_size)
    img = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(img)
    jitter = round(knobs["jitter"] * scale)
    x0 = round(6 * scale) + (rng.randint(0, jitter) if jitter else 0)
    y = round(4 * scale) + (rng.randint(0, jitter) if jitter else 0)
    line = font_size + max(2, round(5 * scale))
    if knobs["title"]:
        draw.text((x0, y), rng.choice(TITLES), font=font, fill=(90, 90, 90))
        y += line
    for label, value in rows:
        draw.text((x0, y), f"{label}: {value}", font=font, fill="black")
        y += line
    return img


def _png(img: Image.Image) -> dict[str, Any]:
    """PNG bytes (what ``datasets.Image`` stores), encoded once per page and shared by its questions."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def render_docvqa(
    n_docs: int,
    seed: int,
    *,
    heldout: bool = False,
    image_size: int = 128,
    with_answers: bool = True,
    **knobs: Any,
) -> datasets.Dataset:
    """Render ``n_docs`` synthetic pages, one row per (page, field) question, in DocVQA's schema.

    Deterministic given the arguments.  ``heldout`` draws values from the held-out partition
    (see :func:`value_split`); ``with_answers=False`` mimics DocVQA's test split (``answers`` is ``None``).
    Knobs (defaults in ``DEFAULT_KNOBS``): n_fields, value_digits, heldout_frac, font_size, shuffle_rows,
    jitter, title, doc_id_offset.
    """
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown rendering knobs: {sorted(unknown)}")
    k = {**DEFAULT_KNOBS, **knobs}
    if not 1 <= k["n_fields"] <= len(FIELDS):
        raise ValueError(f"n_fields must be in 1..{len(FIELDS)}")
    train_values, heldout_values = value_split(k["value_digits"], k["heldout_frac"])
    pool = heldout_values if heldout else train_values
    rng = random.Random(f"{seed}-{int(heldout)}-{int(with_answers)}")
    offset = k["doc_id_offset"]
    if offset is None:
        offset = (2 if not with_answers else int(heldout)) * 1_000_000 + (seed % 1000) * 1000

    rows: dict[str, list[Any]] = {name: [] for name in DOCVQA_FEATURES}
    for i in range(n_docs):
        fields = list(FIELDS[: k["n_fields"]])
        values = [rng.choice(pool) for _ in fields]
        order = list(range(len(fields)))
        if k["shuffle_rows"]:
            rng.shuffle(order)
        img = _png(_render_page([(fields[j][0], values[j]) for j in order], rng, image_size, k))
        doc_id = offset + i
        for j, (_, question) in enumerate(fields):
            rows["questionId"].append(doc_id * 10 + j)
            rows["question"].append(question)
            rows["question_types"].append(["form"])
            rows["image"].append(img)
            rows["docId"].append(doc_id)
            rows["ucsf_document_id"].append(f"syn{doc_id:07d}")
            rows["ucsf_document_page_no"].append("1")
            rows["answers"].append([values[j]] if with_answers else None)
    return datasets.Dataset.from_dict(rows, features=DOCVQA_FEATURES)


def demo_splits(
    seed: int = 0, n_train_docs: int = 4096, n_eval_docs: int = 200, **knobs: Any
) -> datasets.DatasetDict:
    """train (train values) / validation (held-out values) / test (held-out values, no answers)."""
    return datasets.DatasetDict(
        {
            "train": render_docvqa(n_train_docs, seed, **knobs),
            "validation": render_docvqa(n_eval_docs, seed, heldout=True, **knobs),
            "test": render_docvqa(n_eval_docs, seed, heldout=True, with_answers=False, **knobs),
        }
    )
