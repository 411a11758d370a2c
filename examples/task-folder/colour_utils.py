"""Row function for colour_sentence.yaml: florence-kit imports this file (named in the task file's
``row_map``) only when data is loaded, and calls ``add_sentence(row)`` on every row."""


def add_sentence(row: dict) -> dict:
    """Add the target sentence, e.g. ``{"colour": "red"}`` -> ``"The shape is red."``."""
    return {**row, "sentence": f"The shape is {row['colour'].strip().lower()}."}
