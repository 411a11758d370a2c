"""The offline demo: tiny random Florence-2 + rendered DocVQA → eval → fine-tune → eval, on CPU.

It goes through the same path a user's run does (model folder, ``save_to_disk`` dataset, the
trainer, the evaluator), so a demo that works is evidence the pipeline works.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.metrics import get_metric


@dataclass
class DemoRecipe:
    """What the demo trains with; measured to read held-out values within the CPU budget (README).

    Pages are 128 px forms with 1-4 fields ("Total", "Tax", "Items", "Room"), each a 3-digit value in a
    "comb" field (one 32 px cell per digit); held-out pages use values never seen in training.
    """

    n_fields: int = 4
    min_fields: int = 1
    n_train_docs: int = 4096
    n_eval_docs: int = 320
    steps: int = 600
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 50
    schedule: str = "cosine"
    weight_decay: float = 0.0
    eval_batch_size: int = 100
    max_new_tokens: int = 8  # answers are 3 digits; a random model would otherwise ramble for 64 tokens
    knobs: dict[str, Any] = field(default_factory=dict)


def answer_prior(train: Any, eval_split: Any) -> list[str]:
    """Always the most frequent training answer for that question (the baseline reading must beat)."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for question, answers in zip(train["question"], train["answers"], strict=True):
        if answers:
            by_question[question][answers[0]] += 1
            overall[answers[0]] += 1
    fallback = overall.most_common(1)[0][0] if overall else ""
    return [
        by_question[q].most_common(1)[0][0] if by_question.get(q) else fallback for q in eval_split["question"]
    ]


def prior_scores(train: Any, eval_split: Any) -> dict[str, float]:
    preds = answer_prior(train, eval_split)
    out = {}
    for name in ("anls", "exact_match"):
        metric = get_metric(name)
        scores = [metric.score(p, refs) for p, refs in zip(preds, eval_split["answers"], strict=True)]
        out[name] = metric.aggregate(scores)
    return out


def run_demo(out: Path, seed: int, recipe: DemoRecipe, quiet: bool, print_fn: Any = print) -> dict[str, Any]:
    """Build, evaluate, fine-tune, evaluate; returns (and writes) the summary."""
    import time

    from florence_kit.data.dataset import load_split
    from florence_kit.demo.synthetic_docvqa import demo_splits
    from florence_kit.evaluate.scoring import answer_and_score, write_results
    from florence_kit.model.loading import load_model
    from florence_kit.model.tiny import save_tiny
    from florence_kit.tasks.registry import get_task
    from florence_kit.train.recipe import TrainConfig, finetune

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    init_dir, data_dir = out / "model-init", out / "data"
    save_tiny(init_dir, seed=seed)
    splits = demo_splits(
        seed, recipe.n_train_docs, recipe.n_eval_docs, n_fields=recipe.n_fields, min_fields=recipe.min_fields,
        **recipe.knobs,
    )
    splits.save_to_disk(str(data_dir))
    print_fn(
        f"rendered {len(splits['train'])} training questions and {len(splits['validation'])} held-out questions "
        f"({recipe.min_fields}-{recipe.n_fields} fields per page; held-out values never appear in training)"
    )
    task = get_task("docvqa")
    validation = load_split(task, str(data_dir), task.dataset.eval_split)

    def run_eval(model_dir: Path, name: str) -> dict[str, Any]:
        model, processor = load_model(str(model_dir))
        result = answer_and_score(model, processor, task, validation, batch_size=recipe.eval_batch_size,
                          max_new_tokens=recipe.max_new_tokens, show_progress=not quiet)
        write_results(result, out / name)
        return result.metrics

    before = run_eval(init_dir, "eval-before")
    cfg = TrainConfig(
        task="docvqa", model=str(init_dir), dataset=str(data_dir), output_dir=out / "finetuned",
        max_steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        schedule=recipe.schedule, weight_decay=recipe.weight_decay, seed=seed, overwrite=True, log_every=25,
        prepare_data=True,  # pages decoded and resized once: the same batches, the same result, faster
    )
    trained = finetune(cfg, quiet=quiet, print_fn=print_fn)
    shutil.rmtree(out / "finetuned" / "prepared", ignore_errors=True)  # 200 MB of resized pages, used up
    after = run_eval(out / "finetuned", "eval-after")
    summary = {
        "seed": seed,
        "held_out_questions": before["n"],
        "anls": {"before": before["anls"], "after": after["anls"]},
        "exact_match": {"before": before["exact_match"], "after": after["exact_match"]},
        "answer_prior": prior_scores(splits["train"], splits["validation"]),
        "train_steps": trained.steps,
        "train_seconds": round(trained.seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "recipe": {k: v for k, v in recipe.__dict__.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
