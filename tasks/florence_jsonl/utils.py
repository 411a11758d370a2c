"""row_map of the florence-jsonl task: the reference the ``florence_task`` metric reads (task token + answer)."""

from __future__ import annotations

import json
from typing import Any

from florence_kit.metrics.florence_task import task_token


def reference(row: dict[str, Any]) -> dict[str, Any]:
    """Add ``reference``: ``{"task": "<OD>", "answer": suffix}`` as JSON, so the metric knows how to score."""
    suffix = row.get("suffix")
    return {**row, "reference": json.dumps({"task": task_token(str(row.get("prefix") or "")),
                                            "answer": "" if suffix is None else str(suffix)})}
