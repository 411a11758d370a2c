"""Stage 4, evaluate: batched generation (``generation``), the batch engine every caller shares (``batch``),
region answers (``regions``), scoring with the task's metrics into predictions.jsonl / metrics.json (``scoring``),
``predict`` over a corpus (``corpus``) and evaluation as a library call (``harness``: :func:`run_eval`).
Training uses it for ``--eval-every``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_eval"]


def __getattr__(name: str) -> Any:
    """``florence_kit.evaluate.run_eval`` without importing the metrics whenever a submodule is imported."""
    if name == "run_eval":
        from florence_kit.evaluate.harness import run_eval

        return run_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
