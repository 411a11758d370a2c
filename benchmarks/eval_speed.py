"""Eval samples/s: florence-kit's batched, length-sorted evaluation vs one example at a time.

    python -m benchmarks.eval_speed                 # tiny model, 48 examples
    python -m benchmarks.eval_speed --model small   # 4+4-layer BART d=256, 384 px (145 image tokens)

Both sides run :func:`florence_kit.evaluate.scoring.answer_and_score` on the same model and the same examples in the
same process; the baseline is ``batch_size=1`` without sorting (what a plain loop does). Each row
prints samples/s, the speed-up over that baseline, and how many predictions differ from it (must be 0).

The models are random (no weights can be downloaded here). Their cross-attention output is scaled up
3x so answers depend on each page and question (otherwise a random model says nearly the same thing
to every input and "identical predictions" would prove little); every answer runs to
``--max-new-tokens`` since a random model rarely emits </s>, which is the same work on both sides.
Questions cycle through lengths typical of DocVQA (1 to 40 words) so batches carry real padding.
On a shared CPU wall-clock rates swing with the other load; the ratio per CPU-second of this process
(``time.process_time``; meaningful with ``--threads 1``) is printed beside it.
"""

from __future__ import annotations

import argparse
import time

QUESTIONS = [
    "What is the total?",
    "What is the date written at the top of the invoice, just under the sender's address?",
    "amount",
    "Which company sent this letter, and what is the zip code printed in the sender block on the top left "
    "corner of the first page of the document, next to the logo and the telephone number of the office?",
    "Who signed the letter?",
    "What is the reference number?",
    "How many items are listed in the table in the middle of the page, counting every row with a price?",
    "What is the name of the person to whom the memo is addressed?",
]

MODELS = {
    # name: (tiny_config overrides, image size)
    "tiny": ({}, 128),
    "small": (
        {
            "d_model": 256,
            "encoder_layers": 4,
            "decoder_layers": 4,
            "encoder_ffn_dim": 1024,
            "decoder_ffn_dim": 1024,
            "encoder_attention_heads": 8,
            "decoder_attention_heads": 8,
            "vision_embed_dim": (256,),
            "vision_num_heads": (8,),
            "vision_num_groups": (8,),
        },
        384,
    ),
}


def build_model(name: str, seed: int = 0):
    """A random Florence-2 of the named size, with answers made input-dependent (see module docstring)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.tiny import VOCAB_SIZE, build_processor, reinit_default, tiny_config

    overrides, image_size = MODELS[name]
    processor = build_processor(image_size)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(tiny_config(VOCAB_SIZE, image_size, **overrides))
    reinit_default(model)
    model.tie_weights()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "encoder_attn.out_proj" in param_name:
                param.mul_(3.0)
    return model.eval(), processor


def build_split(n: int, seed: int = 0, per_page: int = 1):
    """``n`` DocVQA examples (public schema) on rendered pages, ``per_page`` questions each, of varied length."""
    from florence_kit.demo.synthetic_docvqa import demo_splits

    docs = -(-n // per_page)
    pages = demo_splits(seed=seed, n_train_docs=1, n_eval_docs=docs, n_fields=per_page)["validation"].select(range(n))
    return pages.map(lambda row, i: {"question": QUESTIONS[i % len(QUESTIONS)]}, with_indices=True)


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from florence_kit.evaluate.scoring import answer_and_score
    from florence_kit.tasks.registry import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task("docvqa")
    model, processor = build_model(args.model)
    split = build_split(args.n, per_page=args.per_page)
    common = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens, "show_progress": False,
              "thumbnail_size": None}
    answer_and_score(model, processor, task, split.select(range(2)), batch_size=2, by_page=False, **common)  # warm-up
    settings = [("one at a time (baseline)", 1, False, False)]
    for size in args.batch_sizes:
        settings += [(f"batch {size}, dataset order", size, False, False),
                     (f"batch {size}, sorted by length (--speed off)", size, True, False),
                     (f"batch {size}, pages together (default)", size, True, True)]
    rows, baseline = [], None
    for label, size, sort, by_page in settings:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = answer_and_score(model, processor, task, split, batch_size=size, sort_by_length=sort, by_page=by_page,
                          **common)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        predictions = [rec["prediction"] for rec in result.predictions]
        rate, cpu_rate = len(predictions) / seconds, len(predictions) / cpu_seconds
        if baseline is None:
            baseline = {"predictions": predictions, "rate": rate, "cpu_rate": cpu_rate}
        differ = sum(a != b for a, b in zip(predictions, baseline["predictions"], strict=True))
        rows.append({"setting": label, "samples_per_s": rate, "speedup": rate / baseline["rate"],
                     "cpu_speedup": cpu_rate / baseline["cpu_rate"], "differ": differ,
                     "distinct": len(set(predictions))})
        print(f"{label:32s} {rate:8.2f} samples/s  {rate / baseline['rate']:5.2f}x  "
              f"(per CPU-second {cpu_rate / baseline['cpu_rate']:5.2f}x)  "
              f"{differ} of {len(predictions)} predictions differ ({len(set(predictions))} distinct)", flush=True)
    return rows


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"model `{args.model}`, {args.n} examples ({args.per_page} per page), greedy" if args.num_beams == 1 else
        f"model `{args.model}`, {args.n} examples ({args.per_page} per page), {args.num_beams} beams",
        "",
        "| setting | samples/s | vs one at a time | same, per CPU-second | predictions differing |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['setting']} | {r['samples_per_s']:.2f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x "
              f"| {r['differ']}/{args.n} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--n", type=int, default=48, help="examples to evaluate")
    parser.add_argument("--per-page", type=int, default=4, help="questions per page (DocVQA: about 4)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    import torch

    rows = run(args)
    print(f"\n(torch {torch.__version__}, {torch.get_num_threads()} thread(s), device cpu)\n")
    print(markdown(rows, args))
    if any(r["differ"] for r in rows):
        raise SystemExit("batched predictions differ from one-at-a-time predictions")


if __name__ == "__main__":
    main()
