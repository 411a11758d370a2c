"""Synthetic documents rendered in the exact public DocVQA schema (HuggingFaceM4/DocumentVQA).

The demo and the tests need a DocVQA-shaped dataset that exists offline, renders identically everywhere
and can only be solved by *reading* the page.  Every document is a small form ("Total: 482", "Tax: 107", ...)
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
# Defaults = the layout the CPU demo is tuned for (see the demo research notes): a 128 px "comb" form with
# 32 px lines and one 32 px cell per digit, i.e. one glyph per image token of the tiny model's 4x4 grid.
# value_x=None and char_pitch=None give a plain inline "Label: value" layout instead.
DEFAULT_KNOBS: dict[str, Any] = {
    "n_fields": 1,  # fields (= questions) per page, taken from FIELDS in order (max 4 fit at line_height 32)
    "min_fields": None,  # if set, each page shows a random subset of min_fields..n_fields of those fields
    "value_digits": 3,  # values are numbers with exactly this many digits (900 values for 3 digits)
    "heldout_frac": 0.2,  # fraction of all values reserved for held-out documents
    "font_size": 28,  # px, Pillow's embedded font, for the values
    "label_font_size": 10,  # px for title and labels; None = font_size
    "margin_x": 1,  # left margin, px
    "margin_y": 0,  # top margin, px
    "line_height": 32,  # line pitch in px; None = largest font size + 5
    "value_x": 32,  # x of the value column (px); None = the value follows "Label: " inline
    "char_pitch": 32,  # one value character per `char_pitch` px cell (a "comb" form field); None = plain text
    "shuffle_rows": False,  # put the fields on random lines instead of each on its own fixed line
    "jitter": 0,  # max random x/y offset of the whole page content, px
    "title": False,  # print a title line ("INVOICE", ...) above the fields
    "doc_id_offset": None,  # docId of the first document (default: derived from the split)
}


def value_split(value_digits: int = 3, heldout_frac: float = 0.2) -> tuple[list[str], list[str]]:
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
    rows: list[tuple[int, str, str]], rng: random.Random, image_size: int, knobs: dict[str, Any]
) -> Image.Image:
    """Draw one page; coordinates are in a 128 px design space scaled to ``image_size``.

    ``rows`` are (slot, label, value); slot ``i`` is drawn ``i`` lines below the first (title excluded), so
    absent fields leave their line blank.  Each line's text sits on a common baseline, with the value's
    digits vertically centred in a band of height ``char_pitch`` (or ``font_size``) at the top of the line.
    """
    scale = image_size / 128
    font = ImageFont.load_default(size=max(6, round(knobs["font_size"] * scale)))
    label_size = knobs["label_font_size"] or knobs["font_size"]
    label_font = ImageFont.load_default(size=max(6, round(label_size * scale)))
    img = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(img)
    jitter = knobs["jitter"]
    dx, dy = (rng.randint(0, jitter), rng.randint(0, jitter)) if jitter else (0, 0)
    x0 = (knobs["margin_x"] + dx) * scale
    line = knobs["line_height"] or max(knobs["font_size"], label_size) + 5
    band = knobs["char_pitch"] or knobs["font_size"]
    digit_h = -font.getbbox("0", anchor="ls")[1]  # cap height of the digits, px
    pitch = knobs["char_pitch"] * scale if knobs["char_pitch"] else None
    top = knobs["margin_y"] + dy
    if knobs["title"]:
        base = round(top * scale + (band * scale + digit_h) / 2)
        draw.text((round(x0), base), rng.choice(TITLES), font=label_font, fill=(90, 90, 90), anchor="ls")
        top += line
    for slot, label, value in rows:
        base = round((top + slot * line) * scale + (band * scale + digit_h) / 2)  # centres the digits
        if knobs["value_x"] is None and pitch is None and label_size == knobs["font_size"]:
            draw.text((round(x0), base), f"{label}: {value}", font=font, fill="black", anchor="ls")
            continue
        draw.text((round(x0), base), f"{label}:", font=label_font, fill="black", anchor="ls")
        if knobs["value_x"] is not None:
            vx = (knobs["value_x"] + dx) * scale
        else:
            vx = x0 + label_font.getlength(f"{label}: ")
        if pitch is None:
            draw.text((round(vx), base), value, font=font, fill="black", anchor="ls")
        else:
            for c, ch in enumerate(value):  # one glyph centred in each cell of a "comb" field
                draw.text((round(vx + (c + 0.5) * pitch), base), ch, font=font, fill="black", anchor="ms")
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
    Knobs and their defaults: see ``DEFAULT_KNOBS``.
    """
    unknown = set(knobs) - set(DEFAULT_KNOBS)
    if unknown:
        raise TypeError(f"unknown rendering knobs: {sorted(unknown)}")
    k = {**DEFAULT_KNOBS, **knobs}
    if not 1 <= k["n_fields"] <= len(FIELDS):
        raise ValueError(f"n_fields must be in 1..{len(FIELDS)}")
    min_fields = k["min_fields"] or k["n_fields"]
    if not 1 <= min_fields <= k["n_fields"]:
        raise ValueError("min_fields must be in 1..n_fields")
    line = k["line_height"] or max(k["font_size"], k["label_font_size"] or k["font_size"]) + 5
    bottom = k["margin_y"] + k["jitter"] + (k["n_fields"] - 1 + int(k["title"])) * line
    if bottom + (k["char_pitch"] or k["font_size"]) > 128:
        raise ValueError(f"{k['n_fields']} fields do not fit on the page with these layout knobs")
    train_values, heldout_values = value_split(k["value_digits"], k["heldout_frac"])
    pool = heldout_values if heldout else train_values
    rng = random.Random(f"{seed}-{int(heldout)}-{int(with_answers)}")
    offset = k["doc_id_offset"]
    if offset is None:
        offset = (2 if not with_answers else int(heldout)) * 1_000_000 + (seed % 1000) * 1000

    rows: dict[str, list[Any]] = {name: [] for name in DOCVQA_FEATURES}
    for i in range(n_docs):
        # Which fields this page has (each keeps its own line unless shuffle_rows) and their values.
        present = list(range(k["n_fields"]))
        if min_fields < k["n_fields"]:
            present = sorted(rng.sample(present, rng.randint(min_fields, k["n_fields"])))
        fields = [FIELDS[j] for j in present]
        values = [rng.choice(pool) for _ in fields]
        slots = present[:]
        if k["shuffle_rows"]:
            slots = rng.sample(range(k["n_fields"]), len(present))
        page = [(slot, f[0], v) for slot, f, v in zip(slots, fields, values, strict=True)]
        img = _png(_render_page(page, rng, image_size, k))
        doc_id = offset + i
        for j, (_, question), value in zip(present, fields, values, strict=True):
            rows["questionId"].append(doc_id * 10 + j)
            rows["question"].append(question)
            rows["question_types"].append(["form"])
            rows["image"].append(img)
            rows["docId"].append(doc_id)
            rows["ucsf_document_id"].append(f"syn{doc_id:07d}")
            rows["ucsf_document_page_no"].append("1")
            rows["answers"].append([value] if with_answers else None)
    return datasets.Dataset.from_dict(rows, features=DOCVQA_FEATURES)


def demo_splits(
    seed: int = 0, n_train_docs: int = 4096, n_eval_docs: int = 200, **knobs: Any
) -> datasets.DatasetDict:
    """train (train values) / validation (held-out values) / test (held-out values, ``answers=None``).

    ``min_fields`` (a curriculum expressed as data: pages with fewer fields teach reading before the model
    must pick the asked line) only applies to train; validation and test pages always show all ``n_fields``.
    """
    eval_knobs = {**knobs, "min_fields": None}
    return datasets.DatasetDict(
        {
            "train": render_docvqa(n_train_docs, seed, **knobs),
            "validation": render_docvqa(n_eval_docs, seed, heldout=True, **eval_knobs),
            "test": render_docvqa(n_eval_docs, seed, heldout=True, with_answers=False, **eval_knobs),
        }
    )
