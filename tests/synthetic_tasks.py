"""Small offline datasets in the exact public schemas of The Cauldron, COCO-style captions, IAM lines and VQAv2.

They let the tests train and score every task family without a network.
Pictures are simple shapes and words drawn with Pillow's embedded font; each answer is a fact of the
picture (its colour, its shape, its word), so a model can only get them right by looking.
"""

from __future__ import annotations

import random

import datasets
from PIL import Image, ImageDraw, ImageFont

# HuggingFaceM4/the_cauldron (every config): a list of images and a list of turns.
CAULDRON_FEATURES = datasets.Features(
    {
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    }
)
# HuggingFaceM4/VQAv2: ten human answers per question, and the most common one.
VQAV2_FEATURES = datasets.Features(
    {
        "question_type": datasets.Value("string"),
        "multiple_choice_answer": datasets.Value("string"),
        "answers": [{"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
                     "answer_id": datasets.Value("int64")}],
        "image_id": datasets.Value("int64"),
        "answer_type": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
    }
)
# Teklia/IAM-line: a line image and its transcription.
OCR_FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
# COCO-style captions: an image and several reference captions.
CAPTION_FEATURES = datasets.Features(
    {"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))}
)

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220), "black": (0, 0, 0)}
SHAPES = ("square", "circle")
WORDS = ("cat", "sun", "map", "red", "box", "pen", "cup", "dog", "hat", "key")


def shape_image(colour: str, shape: str, size: int = 64) -> Image.Image:
    """One coloured shape on white."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def text_image(text: str, width: int = 128, height: int = 32) -> Image.Image:
    """A line of black text on white (Pillow's embedded font, identical on every machine)."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((4, 4), text, fill="black", font=ImageFont.load_default(size=20))
    return image


def cauldron_rows(n_rows: int = 8, seed: int = 0) -> datasets.Dataset:
    """Cauldron rows: row 0 has three turns, row 1 has two images (a comparison question), the rest 1-2 turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        turns = [{"user": "What colour is the shape?", "assistant": colour, "source": "synthetic"},
                 {"user": "Which shape is it? Answer square or circle.", "assistant": shape, "source": "synthetic"}]
        images = [shape_image(colour, shape)]
        if i == 0:
            turns.append({"user": "Is the shape a square? Answer yes or no.",
                          "assistant": "yes" if shape == "square" else "no", "source": "synthetic"})
        elif i == 1:
            other = rng.choice([c for c in COLOURS if c != colour])
            images.append(shape_image(other, shape))
            turns = [{"user": "What colour is the shape in the right image?", "assistant": other,
                      "source": "synthetic"}]
        else:
            turns = turns[: 1 + i % 2]
        rows.append({"images": images, "texts": turns})
    return datasets.Dataset.from_list(rows, features=CAULDRON_FEATURES)


def caption_rows(n_rows: int = 8, seed: int = 0) -> datasets.Dataset:
    """COCO-style rows: an image and five reference captions."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        captions = [f"a {colour} {shape}", f"a {colour} {shape} on a white background", f"one {colour} {shape}",
                    f"a {shape} that is {colour}", f"a simple {colour} {shape}"]
        rows.append({"image": shape_image(colour, shape), "captions": captions})
    return datasets.Dataset.from_list(rows, features=CAPTION_FEATURES)


def ocr_rows(n_rows: int = 8, seed: int = 0) -> datasets.Dataset:
    """IAM-line-style rows: a rendered line of two words and its transcription."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        text = f"{rng.choice(WORDS)} {rng.choice(WORDS)}"
        rows.append({"image": text_image(text), "text": text})
    return datasets.Dataset.from_list(rows, features=OCR_FEATURES)


def vqa_rows(n_rows: int = 8, seed: int = 0) -> datasets.Dataset:
    """VQAv2 rows: ten human answers per question, mostly right, some disagreeing."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        humans = [colour] * 7 + [wrong] * 3
        rows.append({
            "question_type": "what color is the", "multiple_choice_answer": colour,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(humans)],
            "image_id": 1000 + i, "answer_type": "other", "question_id": 10_000 + i,
            "question": f"What color is the {shape}?", "image": shape_image(colour, shape),
        })
    return datasets.Dataset.from_list(rows, features=VQAV2_FEATURES)


def splits(make, n_train: int = 8, n_eval: int = 4, seed: int = 0) -> datasets.DatasetDict:
    """``train`` and ``validation`` splits from one of the row makers above."""
    return datasets.DatasetDict({"train": make(n_train, seed), "validation": make(n_eval, seed + 1)})
