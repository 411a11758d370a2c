"""flash-attn 2 vs SDPA (vs eager) on a CUDA GPU: the same outputs within bf16 tolerance, and the step time.

    bash -c 'source benchmarks/gpu_env.sh && python3 -m benchmarks.attn_gpu --json $OUT/attn.json'

Needs a CUDA GPU (``--attn flash`` needs CUDA and ``pip install "florence-kit[flash]"``); no results recorded yet.
Base-sized random Florence-2 (benchmarks.train_speed.BASE_OVERRIDES) at 768 px in bf16; batches of questions of
very different lengths, padded to the longest (where flash-attn's unpadded kernels pay). For each kernel of the
language model: the loss and logits of one batch against SDPA's (max abs difference; bf16 tolerance), the mean
time of a full training step (forward, backward, AdamW) and of greedy generation of 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

PROMPTS = ["<DocVQA>total?", "<DocVQA>What is the date written at the top of the invoice, just under the sender?",
           "<DocVQA>a", "<DocVQA>Which company sent this letter, and what is the zip code printed in the sender "
           "block on the top left corner of the first page, next to the logo and the telephone number?"]


def build(implementation: str) -> tuple[Any, Any]:
    import torch
    from transformers import Florence2ForConditionalGeneration

    from benchmarks.train_speed import BASE_IMAGE_SIZE, BASE_OVERRIDES
    from florence_kit.model.attention import apply_attn
    from florence_kit.model.tiny import build_processor, image_seq_length, tiny_config

    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(tiny_config(**BASE_OVERRIDES)).to("cuda", torch.bfloat16)
    apply_attn(model, implementation)
    processor = build_processor(BASE_IMAGE_SIZE)
    seq = image_seq_length(BASE_IMAGE_SIZE, BASE_OVERRIDES["vision_patch_stride"])  # 577, as Florence-2-base
    processor.image_processor.image_seq_length = seq
    processor.image_seq_length = processor.image_processor.image_seq_length
    return model, processor


def batch(processor: Any, size: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8)) for _ in range(size)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding="longest", padding_side="right")
    answers = [" ".join([f"answer {i}"] * (1 + i % 3)) for i in range(size)]  # targets of different lengths
    labels = processor.tokenizer(answers,
                                 return_tensors="pt", padding="longest")["input_ids"]
    labels[labels == processor.tokenizer.pad_token_id] = -100
    out = {k: v.to("cuda") for k, v in inputs.items()}
    out["pixel_values"] = out["pixel_values"].to(torch.bfloat16)
    out["labels"] = labels.to("cuda")
    return out


def timed(fn: Any, repeats: int) -> float:
    import torch

    fn()  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(implementation: str, size: int, repeats: int) -> dict[str, Any]:
    import torch

    from florence_kit.evaluate.generation import generation_config

    model, processor = build(implementation)
    inputs = batch(processor, size)
    torch.cuda.reset_peak_memory_stats()
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    reference = {"loss": float(out.loss), "logits": out.logits.float().cpu()}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed(step, repeats)
    model.eval()
    config = generation_config(model, processor, {"max_new_tokens": 32, "min_new_tokens": 32})
    gen_inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def generate() -> None:
        with torch.inference_mode():
            model.generate(**gen_inputs, generation_config=config)

    generate_s = timed(generate, max(1, repeats // 2))
    torch.cuda.empty_cache()
    return {"attn": implementation, "batch": size, "loss": reference["loss"], "logits": reference["logits"],
            "train_step_s": step_s, "generate_s": generate_s, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from florence_kit.model.attention import FLASH, resolve_attn

    print("auto picks:", resolve_attn("auto", cuda=True, precision="bf16"))
    rows = []
    for size in map(int, args.batch_sizes.split(",")):
        results = {impl: measure(impl, size, args.repeats) for impl in ("sdpa", FLASH, "eager")}
        base = results["sdpa"]
        for r in results.values():
            rows.append({**{k: v for k, v in r.items() if k != "logits"},
                         "max_abs_logit_diff_vs_sdpa": float((r["logits"] - base["logits"]).abs().max()),
                         "loss_diff_vs_sdpa": abs(r["loss"] - base["loss"]),
                         "step_speedup_vs_sdpa": base["train_step_s"] / r["train_step_s"],
                         "generate_speedup_vs_sdpa": base["generate_s"] / r["generate_s"]})
    print("| attn | batch | loss | loss diff | max logit diff | train step s | × sdpa | generate s | × sdpa "
          "| peak GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['attn']} | {r['batch']} | {r['loss']:.4f} | {r['loss_diff_vs_sdpa']:.4f} "
              f"| {r['max_abs_logit_diff_vs_sdpa']:.3f} | {r['train_step_s']:.3f} | {r['step_speedup_vs_sdpa']:.2f} "
              f"| {r['generate_s']:.3f} | {r['generate_speedup_vs_sdpa']:.2f} | {r['peak_gb']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
