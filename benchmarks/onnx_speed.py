"""ONNX export speed and int8 accuracy: onnxruntime fp32 / int8 against florence-kit's PyTorch generation.

    python -m benchmarks.onnx_speed --demo runs/demo          # after `florence-kit demo --output-dir runs/demo`
    python -m benchmarks.onnx_speed --demo runs/demo --skip-base --json onnx_speed.json

For each model (the demo's fine-tuned tiny model at 128 px; a base-sized random Florence-2 at 768 px, 577 image
tokens) it exports fp32 + int8 graphs once, then times the same inputs through PyTorch
(:func:`florence_kit.evaluate.generation.generate`, what ``predict``/``eval`` run) and through onnxruntime
(the same function on the exported folder) at batch 1 and batch 8, in this one process.
It prints samples/s, the ratio to PyTorch, whether the fp32 answers are identical to PyTorch's (they must be) and
how many int8 answers are, and the graphs' file sizes. On the demo's held-out set it scores ANLS for PyTorch,
ONNX fp32 and ONNX int8 with :func:`florence_kit.evaluate.scoring.answer_and_score`.

Every table is printed with the machine that made it (CPU model, the cores the process may use, the ISA
extensions that decide which kernels run: AVX2, AVX-512, VNNI, AMX) and the load average before and after: the
same model on two CPUs of one family can differ by 30 %, so a figure without its machine says little. The three
runners are timed in turn, ``--repeats`` times; each rate is the median of its repeats and each ratio the median
of the per-repeat ratios: load from other processes then falls on all three alike.

The base-sized model is random (no weights are downloaded here): left alone it emits </s> first and decodes no
token at all, so its answers are held to exactly 16 tokens (``min_new_tokens``), the same decoding work on
every side and more than a DocVQA answer takes. On a shared CPU wall-clock rates swing with other load: the
ratios are from one run, side by side, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTIONS = ["What is the total?", "What is the tax?", "How many items are there?", "What is the room number?"]


ISA_FLAGS = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
             "AMX": ("amx_int8", "amx_bf16", "amx_tile")}


def machine() -> dict[str, Any]:
    """The CPU model, the cores this process may use, the ISA extensions present, versions and the load average."""
    import onnxruntime
    import torch

    from florence_kit.model.onnx_runtime import session_threads, usable_cores

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    physical, logical = usable_cores()
    isa = [name for name, names in ISA_FLAGS.items() if flags & set(names)]
    return {"cpu": model, "physical_cores": physical, "logical_cpus": logical, "isa": isa,
            "onnxruntime_threads": session_threads(), "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}


def describe(info: dict[str, Any]) -> str:
    """One line: ``Intel(R) Xeon(R) Processor, 2 cores (2 logical), AVX2 AVX-512 VNNI AMX, ort 2 / torch 2 threads``."""
    return (f"{info['cpu']}, {info['physical_cores']} cores ({info['logical_cpus']} logical), "
            f"{' '.join(info['isa']) or 'no AVX2'}, threads onnxruntime {info['onnxruntime_threads']} / torch "
            f"{info['torch_threads']}, onnxruntime {info['onnxruntime']}, torch {info['torch']}")


def pages(n: int, size: int, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def timed(model: Any, processor: Any, images: list, prompts: list[str], gen: Any, batch: int) -> tuple[float, list]:
    """(samples/s, answers) for ``images`` in batches of ``batch``, after a one-page warm-up."""
    from florence_kit.evaluate.generation import generate

    generate(model, processor, images[:1], prompts[:1], gen)
    answers: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        answers += generate(model, processor, images[i : i + batch], prompts[i : i + batch], gen)
    return len(images) / (time.perf_counter() - start), answers


def save_base(folder: Path) -> Path:
    """A random base-sized Florence-2 (DaViT 4 stages + 6+6 BART, d=768) with the tiny processor at 768 px."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    from florence_kit.model.memory import builtin_config
    from florence_kit.model.tiny import IMAGE_TOKEN_ID, build_processor

    config = builtin_config("base")
    config.image_token_id = IMAGE_TOKEN_ID  # the tiny tokenizer's <image> (its ids fit in base's vocabulary)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    processor = build_processor(768)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def compare(name: str, model_dir: Path, image_size: int, n: int, max_new_tokens: int, work: Path,
            threads: int, min_new_tokens: int = 0, repeats: int = 3) -> dict[str, Any]:
    from florence_kit.evaluate.generation import generation_config
    from florence_kit.model.loading import load_model
    from florence_kit.model.onnx_runtime import load_onnx_model
    from florence_kit.present.onnx_export import export_onnx

    out = work / f"{name}-onnx"
    start = time.perf_counter()
    info = export_onnx(str(model_dir), out, quantize="int8", print_fn=lambda *_: None)
    export_s = time.perf_counter() - start
    torch_model, processor = load_model(str(model_dir))
    models = {"pytorch": torch_model, "onnx fp32": load_onnx_model(out, "fp32", threads)[0],
              "onnx int8": load_onnx_model(out, "int8", threads)[0]}
    gen = generation_config(torch_model, processor,
                            {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens or None})
    images = pages(n, image_size)
    prompts = [f"<DocVQA>{QUESTIONS[i % len(QUESTIONS)]}" for i in range(n)]
    rows = []
    load_before = machine()["load_average"]
    for batch in (1, 8):
        count = n if batch == 8 else max(4, n // 4)
        rates: dict[str, list[float]] = {label: [] for label in models}
        answers: dict[str, list[str]] = {}
        for _ in range(repeats):  # in turn, so that other load falls on every runner alike
            for label, model in models.items():
                rate, answers[label] = timed(model, processor, images[:count], prompts[:count], gen, batch)
                rates[label].append(rate)
        for label in models:
            same = sum(a == b for a, b in zip(answers[label], answers["pytorch"], strict=True))
            ratios = [r / p for r, p in zip(rates[label], rates["pytorch"], strict=True)]
            rows.append({"model": name, "batch": batch, "runner": label, "samples": count,
                         "samples_per_s": round(statistics.median(rates[label]), 3),
                         "vs_pytorch": round(statistics.median(ratios), 2),
                         "vs_pytorch_each": [round(r, 2) for r in ratios], "same_answers": same})
    sizes = {k: v for k, v in info["files"].items()}
    return {"model": name, "export_s": round(export_s, 1), "max_abs_logit_diff": info["max_abs_logit_diff"],
            "int8_calibration": info.get("int8_calibration"), "file_bytes": sizes, "rows": rows,
            "load_average": [load_before, machine()["load_average"]]}


def demo_anls(demo: Path, work: Path, threads: int) -> dict[str, Any]:
    """ANLS on the demo's held-out set: PyTorch, ONNX fp32, ONNX int8 (the demo's own eval settings)."""
    from florence_kit.data.dataset import load_split
    from florence_kit.demo.run_demo import DemoRecipe
    from florence_kit.evaluate.scoring import answer_and_score
    from florence_kit.model.loading import load_model
    from florence_kit.model.onnx_runtime import load_onnx_model
    from florence_kit.tasks.registry import get_task

    recipe = DemoRecipe()
    task = get_task("docvqa")
    split = load_split(task, str(demo / "data"), task.dataset.eval_split)
    out = work / "demo-onnx"
    models = {"pytorch": load_model(str(demo / "finetuned")), "onnx fp32": load_onnx_model(out, "fp32", threads),
              "onnx int8": load_onnx_model(out, "int8", threads)}
    scores, seconds, predictions = {}, {}, {}
    for label, (model, processor) in models.items():
        start = time.perf_counter()
        result = answer_and_score(model, processor, task, split, batch_size=recipe.eval_batch_size,
                          max_new_tokens=recipe.max_new_tokens, show_progress=False, thumbnail_size=None)
        seconds[label] = round(time.perf_counter() - start, 1)
        scores[label] = result.metrics["anls"]
        predictions[label] = [r["prediction"] for r in result.predictions]
    same = {k: sum(a == b for a, b in zip(v, predictions["pytorch"], strict=True)) for k, v in predictions.items()}
    return {"questions": len(split), "anls": scores, "seconds": seconds, "same_as_pytorch": same}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, required=True, help="a `florence-kit demo --output-dir` folder")
    parser.add_argument("--skip-base", action="store_true", help="only the demo model")
    parser.add_argument("--n", type=int, default=16, help="pages per batch-8 measurement (batch 1: a quarter)")
    parser.add_argument("--base-n", type=int, default=8, help="pages for the base-sized model")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads (0: one per usable physical core)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per runner, taken in turn (median kept)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": machine()}
    where = describe(results["machine"])
    print(f"machine: {where}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as tmp:
        work = Path(tmp)
        results["demo"] = compare("demo", args.demo / "finetuned", 128, args.n, 8, work, args.threads,
                                  repeats=args.repeats)
        results["demo_anls"] = demo_anls(args.demo, work, args.threads)
        if not args.skip_base:
            base_dir = save_base(work / "base")
            results["base"] = compare("base-768", base_dir, 768, args.base_n, 16, work, args.threads,
                                      min_new_tokens=16, repeats=args.repeats)
    for key in ("demo", "base"):
        if key not in results:
            continue
        res = results[key]
        print(f"\n{res['model']}: export {res['export_s']} s, max |logit diff| {res['max_abs_logit_diff']:.1e}, "
              f"int8 convolutions calibrated on {res['int8_calibration']}")
        print(f"  machine: {where}; load average {res['load_average'][0]} -> {res['load_average'][1]}")
        for name, size in res["file_bytes"].items():
            print(f"  {name:36s} {size / 1e6:8.1f} MB")
        print(f"  {'batch':>5} {'runner':10} {'samples/s':>10} {'vs PyTorch':>10} {'same answers':>13}  machine")
        box = results["machine"]
        tag = f"{box['cpu']} x{box['physical_cores']} {'/'.join(box['isa'])}"
        for row in res["rows"]:
            print(f"  {row['batch']:>5} {row['runner']:10} {row['samples_per_s']:>10.3f} {row['vs_pytorch']:>9.2f}x "
                  f"{row['same_answers']:>6}/{row['samples']}  {tag}")
    anls = results["demo_anls"]
    print(f"\ndemo held-out ANLS ({anls['questions']} questions; {where}): "
          + ", ".join(f"{k} {v:.4f} ({anls['seconds'][k]} s, {anls['same_as_pytorch'][k]} same as PyTorch)"
                      for k, v in anls["anls"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
