"""Stage 4, evaluate: batched generation (``generation``), region answers (``regions``) and scoring with
the task's metrics into predictions.jsonl / metrics.json (``scoring``). Training uses it for ``--eval-every``.
"""
