"""Learning the tail: CER past target position 1,024 against the first 1,024, copy vs interpolation of the new rows.

    python -m benchmarks.long_targets                      # tiny model grown to 3,072 positions, 150 steps each
    python -m benchmarks.long_targets --steps 300 --every 75   # the table in docs/long-outputs.md (~15 min)
    python -m benchmarks.long_targets --steps 60 --every 20

The tiny model (1,024 positions, byte-level tokenizer: one token per character) is grown to ``--positions``
twice, once per initialisation of the new rows (model/positions.py), and both copies train the same steps on the
same synthetic long pages (florence_kit/demo/synthetic_pages.py, 1,500-3,000 target tokens) in the same order:
AdamW at lr 3e-4 (at 1e-3 and above the tiny model stays at the characters' unigram entropy, loss ~3.05, for
hundreds of steps), batches from florence-kit's Collator. Every ``--every`` steps, on held-out pages:

- **teacher-forced CER**: the model's most likely next token at every position given the true text before it,
  wrong ones / characters (one token is one character, so the two texts are aligned and every error is a
  substitution) over target positions < 1,024 (head) and >= 1,024 (tail). It measures what each position has
  learned, free of error build-up.
- at the end, **generated CER**: greedy generation of the whole page, the answer split at the reference's
  1,024-token mark, head and tail scored the same way.

The page images are unreadable at the tiny model's 128 px (the words are random), so what is learned is the
pages' text model (numbered lines, words of a fixed list) at every position; a tail that does not learn stays
at a CER near 1 while the head falls. The numbers are CPU-only and small-model: they compare the two
initialisations, not what a real Florence-2 reaches.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

HEAD = 1024  # target positions the stock model has


def cer(pairs: list[tuple[str, str]]) -> float:
    """Set-level CER: edits summed over the pairs (prediction, reference) / reference characters summed."""
    import Levenshtein

    edits = sum(Levenshtein.distance(p, r) for p, r in pairs)
    return edits / max(1, sum(len(r) for _, r in pairs))


def teacher_forced(model: Any, processor: Any, pages: Any) -> tuple[float, float, float, float]:
    """(head CER, tail CER, head loss, tail loss) of next-token predictions given the true prefix."""
    import torch

    head: list[tuple[int, int]] = []
    tail: list[tuple[int, int]] = []
    losses: list[list[Any]] = [[], []]
    model.eval()
    for page in pages:
        inputs = processor(images=[page["image"]], text=["<OCR>"], return_tensors="pt")
        labels = processor.tokenizer([page["text"]], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(**inputs, labels=labels).logits[0].float()
        loss = torch.nn.functional.cross_entropy(logits, labels[0], reduction="none")
        wrong = logits.argmax(-1) != labels[0]  # aligned position by position: one token is one character
        head.append((int(wrong[:HEAD].sum()), HEAD))
        tail.append((int(wrong[HEAD:].sum()), len(wrong) - HEAD))
        losses[0].append(loss[:HEAD])
        losses[1].append(loss[HEAD:])
    model.train()
    rate = [sum(e for e, _ in part) / sum(n for _, n in part) for part in (head, tail)]
    return rate[0], rate[1], float(torch.cat(losses[0]).mean()), float(torch.cat(losses[1]).mean())


def generated(model: Any, processor: Any, pages: Any) -> tuple[float, float, int]:
    """(head CER, tail CER, longest answer in tokens) of greedy answers, split at the reference's token 1,024."""
    from florence_kit.evaluate.generation import generate, generation_config

    head, tail, longest = [], [], 0
    model.eval()
    for page in pages:
        n = len(processor.tokenizer(page["text"])["input_ids"])
        gen = generation_config(model, processor, {"max_new_tokens": n + 64})
        answer = generate(model, processor, [page["image"]], ["<OCR>"], gen)[0]
        longest = max(longest, len(processor.tokenizer(answer)["input_ids"]))
        cut = HEAD - 1  # characters before position 1,024 (position 0 is <s>; one token per character)
        head.append((answer[:cut], page["text"][:cut]))
        tail.append((answer[cut:], page["text"][cut:]))
    model.train()
    return cer(head), cer(tail), longest


def run(init: str, positions: int, train: Any, held_out: Any, steps: int, every: int, batch_size: int, lr: float,
        seed: int) -> list[dict[str, Any]]:
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.data.collate import Collator
    from florence_kit.data.dataset import Example
    from florence_kit.model.positions import grow_positions
    from florence_kit.model.tiny import build_processor, tiny_config

    # transformers' own initialisation (N(0, 0.02) for token and position rows alike), not make_tiny's: there the
    # position rows are N(0, 1) against token rows of N(0, 1/128), the decoder barely sees which character came
    # before, and the loss stays at the characters' unigram entropy for hundreds of steps at these lengths
    processor = build_processor()
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(tiny_config())
    grow_positions(model, positions, init, processor)
    model.train()
    collate = Collator(processor, max_length=positions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    rows, step, start = [], 0, time.perf_counter()

    def record() -> None:
        h, t, hl, tl = teacher_forced(model, processor, held_out)
        rows.append({"init": init, "step": step, "head_cer": h, "tail_cer": t, "head_loss": hl, "tail_loss": tl,
                     "seconds": time.perf_counter() - start})
        print(f"{init:<12} step {step:>4}  teacher-forced CER head {h:.3f} tail {t:.3f}  "
              f"loss head {hl:.3f} tail {tl:.3f}", flush=True)

    record()
    while step < steps:
        for index in torch.randperm(len(train), generator=order).split(batch_size):
            batch = collate([Example(id=str(i), image=train[i]["image"], prompt="<OCR>", target=train[i]["text"],
                                     references=[]) for i in index.tolist()])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0 or step == steps:
                record()
            if step == steps:
                break
    h, t, longest = generated(model, processor, held_out)
    rows[-1].update(generated_head_cer=h, generated_tail_cer=t, longest_answer=longest)
    print(f"{init:<12} step {step:>4}  generated CER head {h:.3f} tail {t:.3f} (longest answer {longest} tokens)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=3072, help="grown table (targets up to this many tokens)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50, help="teacher-forced CER every N steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-pages", type=int, default=32)
    parser.add_argument("--eval-pages", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inits", nargs="+", default=["copy", "interpolate"], choices=["copy", "interpolate"])
    args = parser.parse_args(argv)

    import torch

    from florence_kit.demo.synthetic_pages import page_splits

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pages = page_splits(args.train_pages, args.eval_pages, seed=args.seed, side=128)
    train, held_out = list(pages["train"]), list(pages["validation"])  # images decoded once
    results = {init: run(init, args.positions, train, held_out, args.steps, args.every,
                         args.batch_size, args.lr, args.seed) for init in args.inits}
    print(f"\ntiny model grown 1024 -> {args.positions}; {args.train_pages} train / {args.eval_pages} held-out pages "
          f"(1,500-3,000 target tokens), batch {args.batch_size}, lr {args.lr:g}; CER, lower is better")
    print(f"{'init':<12} {'step':>5} {'TF head':>8} {'TF tail':>8} {'loss head':>10} {'loss tail':>10} "
          f"{'gen head':>9} {'gen tail':>9}")
    for init, rows in results.items():
        for row in rows:
            gen = (f"{row['generated_head_cer']:>9.3f} {row['generated_tail_cer']:>9.3f}"
                   if "generated_head_cer" in row else "")
            print(f"{init:<12} {row['step']:>5} {row['head_cer']:>8.3f} {row['tail_cer']:>8.3f} "
                  f"{row['head_loss']:>10.3f} {row['tail_loss']:>10.3f} {gen}")


if __name__ == "__main__":
    main()
