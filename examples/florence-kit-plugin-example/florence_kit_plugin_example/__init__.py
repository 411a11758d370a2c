"""An example florence-kit plugin: the ``shape_colour`` task (tasks/shape_colour.yaml) and its metric.

Importing the package registers ``colour_match``; florence-kit imports every ``florence_kit.tasks``
entry point before it reads any task file, so task files anywhere may name this metric.
"""

from __future__ import annotations

from collections.abc import Sequence

from florence_kit.metrics import metric

# Words that name the same colour: a model answering "crimson" for "red" is right.
SYNONYMS = {"crimson": "red", "scarlet": "red", "navy": "blue", "azure": "blue", "lime": "green",
            "emerald": "green", "grey": "gray", "colour": "color"}


def canonical_colour(text: str) -> str:
    """The first word, lower-cased, with synonyms mapped to one name."""
    words = text.strip().lower().split()
    first = words[0].strip(".,!") if words else ""
    return SYNONYMS.get(first, first)


@metric("colour_match")
def colour_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the answer names the same colour as a reference (synonyms allowed), else 0.0."""
    return float(any(canonical_colour(prediction) == canonical_colour(ref) for ref in references))
