"""Model FLOPs utilisation of full fine-tuning, Florence-2-base-sized model at 768×768, on a CUDA GPU.

    python -m benchmarks.train_mfu                        # bf16, batch 32: eager and regional torch.compile
    python -m benchmarks.train_mfu --batch 16 --variants eager --end-to-end
    python -m benchmarks.train_mfu --batches 32 64 --variants compiled,compiled+tower+cudnn --profile
    python -m benchmarks.train_mfu --smoke                # CPU, tiny model: the script runs (no MFU meaning)

A variant is ``eager`` or ``compiled`` plus flags joined by ``+`` (``FLAGS`` below: backend switches, what
gets compiled, which attention kernel); ``--profile`` adds each variant's top kernels (also grouped by input
shape) and the DaViT tower's share of a step. ``benchmarks/gpu_mfu_sweep.sh`` holds the runs measured on an
H200; results in ``benchmarks/train_mfu_h200.json`` and docs/benchmarks.md.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul,
convolution and attention kernel of one forward + backward (the optimizer's element-wise work is not
model FLOPs). MFU = counted FLOPs per step × steps per second / the card's dense bf16 peak (989 TFLOP/s
for an H100/H200 SXM; ``--peak-tflops`` for other cards).

* ``model step``: florence-kit's step (``forward_loss`` under bf16 autocast, backward, gradient clipping,
  AdamW) on a batch already on the GPU: what the model and the optimizer reach.
* ``--end-to-end``: ``florence_kit.train.recipe.train_loop`` on rendered DocVQA pages with ``--prepare-data`` (pages
  decoded and resized once, batches gathered in DataLoader workers, Accelerate bf16): what a user's run reaches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU '{name}': pass --peak-tflops (dense bf16)")


DEVICE = "cuda"  # --smoke: "cpu" with the tiny model, to check this script without a GPU
SIZE = {"model": "base", "image": 768}


def build(compiled: bool, flags: set[str] = frozenset()) -> Any:
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.memory import load_config

    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(load_config(SIZE["model"])).to(DEVICE).train()
    if "visioneager" in flags:  # the attention modules read their (shared) vision config at every call
        model.model.vision_tower.config._attn_implementation = "eager"
    if compiled:
        from florence_kit.model.compiling import VISION_BLOCK_CLASS, compile_regions, regions

        torch._dynamo.reset()  # each variant compiles its own graphs (no recompile-limit carried between them)
        if flags & {"tower", "autotune"}:
            vision = {"dynamic": False, **({"mode": "max-autotune-no-cudagraphs"} if "autotune" in flags else {})}
            for block in regions(model):
                if type(block).__name__ != VISION_BLOCK_CLASS:
                    block.compile(dynamic=None)
                elif "tower" not in flags:
                    block.compile(**vision)
            if "tower" in flags:
                model.model.vision_tower.compile(**vision)
        else:
            compile_regions(model)  # what --compile does
        if "embeds" in flags:
            for module in model.modules():
                if type(module).__name__ == "Florence2VisionConvEmbed":
                    module.compile(dynamic=False)
    return model


def count_flops(model: Any, batch: dict) -> float:
    """FLOPs of one forward + backward, counted by torch's dispatcher (matmul, conv, attention)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from florence_kit.train.step import forward_loss

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = forward_loss(model, batch, False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


FLAGS = {
    "compiled": "regional torch.compile (florence_kit/model/compiling.py, as --compile)",
    "fused": "AdamW(fused=True) instead of the product's foreach",
    "cudnn": "torch.backends.cudnn.benchmark = True (image size is fixed: convolution algorithms tuned once)",
    "mathred": "allow_fp16_bf16_reduction_math_sdp(True): the math SDPA kernel (the channel attention's "
               "token-count head size) keeps bf16 instead of upcasting to fp32",
    "tf32": "TF32 for the fp32 matmuls left under autocast",
    "embeds": "also compile DaViT's four patch embeddings (conv + layer norm + permutes)",
    "visioneager": "DaViT attention as plain matmul + softmax (fused by inductor) instead of SDPA",
    "tower": "compile the whole DaViT tower as one static graph (no per-block boundaries: no tangent copies "
             "between blocks, fusion across them) instead of block by block; BART layers stay regional",
    "autotune": "compile DaViT with mode='max-autotune-no-cudagraphs': inductor benchmarks Triton templates for "
                "its matmuls (and convolutions) against cuBLAS/cuDNN and keeps the fastest (minutes to compile)",
    "nocudnnsdp": "torch.backends.cuda.enable_cudnn_sdp(False): SDPA picks flash / mem-efficient kernels",
}


def parse_variant(variant: str) -> set[str]:
    flags = set(variant.split("+")) - {"eager"}
    unknown = flags - set(FLAGS)
    if unknown:
        raise SystemExit(f"unknown variant flag(s) {sorted(unknown)}: use eager or compiled, plus {sorted(FLAGS)}")
    return flags


def apply_flags(flags: set[str]) -> None:
    import torch

    torch.backends.cudnn.benchmark = "cudnn" in flags
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in flags
    torch.backends.cuda.enable_cudnn_sdp("nocudnnsdp" not in flags)
    if hasattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp"):
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp("mathred" in flags)


def backend_state() -> tuple:
    """torch's backend switches that ``apply_flags`` sets, to put back afterwards (tests run in one process)."""
    import torch

    cuda = torch.backends.cuda
    allowed = getattr(cuda, "fp16_bf16_reduction_math_sdp_allowed", None)
    math = allowed() if allowed else None
    return torch.backends.cudnn.benchmark, cuda.matmul.allow_tf32, cuda.cudnn_sdp_enabled(), math


def restore_backend(state: tuple) -> None:
    import torch

    cuda = torch.backends.cuda
    torch.backends.cudnn.benchmark, cuda.matmul.allow_tf32 = state[0], state[1]
    cuda.enable_cudnn_sdp(state[2])
    if state[3] is not None:
        cuda.allow_fp16_bf16_reduction_math_sdp(state[3])


_FLOPS: dict[int, float] = {}


def model_step(variant: str, batch_size: int, steps: int, warmup: int, profile: bool = False) -> dict:
    import torch

    from benchmarks._measure import batch_for
    from florence_kit.train.step import forward_loss, make_optimizer

    flags = parse_variant(variant)
    apply_flags(flags)
    model = build("compiled" in flags, flags)
    data = {k: v.to(DEVICE) for k, v in batch_for(model.config, batch_size, SIZE["image"], 20, 16).items()}
    if batch_size not in _FLOPS:  # counted eagerly: the compiled graph does the same matmuls
        _FLOPS[batch_size] = count_flops(build(False) if "compiled" in flags else model, data)
    flops = _FLOPS[batch_size]
    if "fused" in flags:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    else:
        optimizer = make_optimizer(model, 1e-5, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = forward_loss(model, data, False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - begin)
    step_s = statistics.median(times)
    row = {"what": f"model step, {variant}", "batch": batch_size, "step_s": step_s, "warmup_s": warm_s,
           "samples_per_s": batch_size / step_s, "flops_per_step": flops, "achieved_tflops": flops / step_s / 1e12,
           "peak_mem_gb": peak_memory()}
    if profile:
        row["tower_share"] = tower_share(model, data, step_s)
        print_profile(step, variant, batch_size)
    return row


def tower_share(model: Any, data: dict, step_s: float) -> float:
    """Fraction of a step spent in the DaViT tower's forward + backward (timed alone, same batch)."""
    import torch

    pixels = data["pixel_values"]

    def tower() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            features = model.model.get_image_features(pixels)
        features = features if torch.is_tensor(features) else features[0]
        features.float().sum().backward()

    tower()
    sync()
    begin = time.perf_counter()
    for _ in range(3):
        tower()
    sync()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - begin) / 3 / step_s


def print_profile(step: Any, variant: str, batch_size: int) -> None:
    """The kernels that take the GPU's time, two steps under torch.profiler (to stdout: the run's log)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(2):
            step()
        sync()
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    print(f"\n# profile: {variant}, batch {batch_size}, two steps")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70), flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(  # which tensors the copies and norms move
        sort_by=key, row_limit=25, max_name_column_width=40, max_shapes_column_width=90), flush=True)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def reset_memory() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def end_to_end(batch_size: int, steps: int, workers: int, compiled: bool) -> dict:
    """florence-kit's own loop on rendered pages; steady-state time per step after two warm-up steps."""
    import torch
    from datasets import DatasetDict
    from transformers import Florence2ForConditionalGeneration

    import florence_kit.train.loop as train
    from benchmarks._measure import batch_for
    from benchmarks.train_speed import BASE_IMAGE_SIZE, BASE_OVERRIDES
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.demo.synthetic_docvqa import render_docvqa
    from florence_kit.model.tiny import build_processor, image_seq_length, tiny_config
    from florence_kit.tasks.registry import get_task

    base = SIZE["model"] == "base"
    overrides, side = (BASE_OVERRIDES, BASE_IMAGE_SIZE) if base else ({}, SIZE["image"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        processor = build_processor(side)
        strides = overrides.get("vision_patch_stride", tiny_config().vision_config.patch_stride)
        processor.image_processor.image_seq_length = image_seq_length(side, strides)
        processor.image_seq_length = processor.image_processor.image_seq_length
        docs = max(2, batch_size * (steps + 2) // 2)
        DatasetDict({"train": render_docvqa(docs, 0, n_fields=2, image_size=side)}).save_to_disk(str(root / "data"))
        torch.manual_seed(0)
        model = Florence2ForConditionalGeneration(tiny_config(**overrides))
        flops_model = Florence2ForConditionalGeneration(tiny_config(**overrides)).to(DEVICE).train()
        sample = {k: v.to(DEVICE) for k, v in batch_for(flops_model.config, batch_size, side, 20, 16).items()}
        flops = count_flops(flops_model, sample)  # same shapes as the loop's batches, give or take the text
        del flops_model, sample
        task = get_task("docvqa")
        dataset = TaskDataset(load_split(task, str(root / "data"), "train"), task, with_target=True)
        stamps: list[float] = []

        def on_step(step: int, total: int, loss: float, lr: float) -> None:
            sync()
            stamps.append(time.perf_counter())

        cfg = train.TrainConfig(task="docvqa", model="-", output_dir=root / "run", mode="full",
                                max_steps=steps + 2, batch_size=batch_size, lr=1e-5, log_every=10**6,
                                num_workers=workers, precision="bf16" if DEVICE == "cuda" else "fp32",
                                compile=compiled, prepare_data=True)
        (root / "run").mkdir()
        train.train_loop(model, processor, dataset, cfg, root / "run" / "metrics.jsonl", on_step=on_step)
    step_s = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return {"what": f"train_loop end to end, --prepare-data, {workers} workers" + (", compiled" if compiled else ""),
            "batch": batch_size, "step_s": step_s, "samples_per_s": batch_size / step_s, "flops_per_step": flops,
            "achieved_tflops": flops / step_s / 1e12, "peak_mem_gb": peak_memory()}


def run_all(args: argparse.Namespace, rows: list[dict]) -> None:
    """The model-step variants at each batch size, then the end-to-end loops; rows appended as they finish."""
    for batch in args.batches or [args.batch]:
        for variant in [v for v in args.variants.split(",") if v]:
            rows.append(model_step(variant, batch, args.steps, args.warmup, args.profile))
            print(json.dumps(rows[-1]), flush=True)
            reset_memory()
            if args.json:  # written as it goes: a run cut short still leaves its rows
                args.json.write_text(json.dumps(rows, indent=1))
    if args.end_to_end:
        apply_flags(set())
        for compiled in [v == "compiled" for v in args.e2e_variants.split(",") if v]:
            rows.append(end_to_end(args.batch, args.steps, args.workers, compiled))
            print(json.dumps(rows[-1]), flush=True)
            reset_memory()


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,compiled",
                   help="model-step variants, comma-separated: eager or compiled, plus flags joined by '+' "
                        "(e.g. compiled+cudnn): " + "; ".join(f"{k}: {v}" for k, v in FLAGS.items()))
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes for the model-step variants (default --batch)")
    p.add_argument("--profile", action="store_true", help="also print each variant's top kernels and tower share")
    p.add_argument("--end-to-end", action="store_true", help="also time florence-kit's train_loop on pages")
    p.add_argument("--e2e-variants", default="eager,compiled", help="--end-to-end loops: eager, compiled")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--json", type=Path)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the script runs (no MFU meaning)")
    args = p.parse_args(argv)
    global DEVICE
    if args.smoke:
        DEVICE, SIZE["model"], SIZE["image"] = "cpu", "tiny", 128
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks.train_mfu needs a CUDA GPU (or --smoke)")
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    peak = peak_tflops(name, args.peak_tflops or (1.0 if args.smoke else None))
    rows: list[dict] = []
    state = backend_state()
    try:
        run_all(args, rows)
    finally:
        restore_backend(state)
    for r in rows:
        r.update(gpu=name, peak_tflops=peak, mfu=r["achieved_tflops"] / peak)
    print(f"\n{name}, bf16 autocast, Florence-2-base-sized random model, 768×768, full fine-tuning\n")
    print("| what | batch | s/step | samples/s | TFLOP/step | TFLOP/s | MFU | peak GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['batch']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} "
              f"| {r['flops_per_step'] / 1e12:.2f} | {r['achieved_tflops']:.0f} | {r['mfu']:.1%} "
              f"| {r['peak_mem_gb']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
