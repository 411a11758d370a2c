"""Predicted vs measured peak memory of a training step, per mode and batch size.

    python -m benchmarks.memory                    # tiny model, every mode, batch 1 and 4 (a few minutes)
    python -m benchmarks.memory --model base       # Florence-2-base-sized random model at 768×768 (slow: ~10 GB RAM)
    python -m benchmarks.memory --from-json benchmarks/memory_base_cpu.jsonl   # re-print saved measurements

Each configuration runs in a fresh subprocess (benchmarks/_measure.py): model built from its config with
random weights, mode applied, two forward+backward+AdamW steps (the second with the optimizer state
allocated). On CPU the measurement is the peak resident set minus the resident set after the imports;
on a CUDA machine (``--device cuda``) ``torch.cuda.max_memory_reserved``. The prediction is
florence_kit.model.memory.estimate for the same setting; tests/test_memory.py holds |measured/predicted - 1| <= 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULTS = {
    "tiny": {"image_size": 128, "prompt": 20, "target": 16, "batches": [1, 4]},
    "base": {"image_size": 768, "prompt": 20, "target": 16, "batches": [1, 2]},
    "large": {"image_size": 768, "prompt": 20, "target": 16, "batches": [1, 2]},
}
# (mode, gradient checkpointing) pairs measured by default
CONFIGS = [("full", False), ("full", True), ("frozen-encoder", False), ("lora", False), ("qlora", False)]


def measure(spec: dict) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._measure", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(spec: dict) -> float:
    from florence_kit.model.memory import Setting, Shape, estimate, load_config, sizes

    s = sizes(load_config(spec["model"]))
    setting = Setting(
        mode=spec["mode"], batch=spec["batch"], checkpointing=bool(spec.get("checkpointing")),
        optim=spec.get("optim", "adamw"), lora_r=spec.get("lora_r", 16), precision=spec.get("precision", "fp32"),
        lora_vision=bool(spec.get("lora_vision")),
    )
    shape = Shape(spec["image_size"], spec["prompt"], spec["target"])
    return estimate(s, setting, shape, spec.get("device", "cpu")).peak


def _device(row: dict) -> str:
    if row.get("device") != "cuda":
        return "CPU fp32"
    return f"{row.get('gpu', 'CUDA')} {row.get('precision', 'fp32')}"


def table(rows: list[dict]) -> str:
    lines = [
        "| model | device | mode | checkpointing | batch | predicted GB | measured GB | measured / predicted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        pred = predict(r)
        meas = r.get("measured")
        ratio = f"{meas / pred:.2f}" if meas else r.get("error", "")
        ratio += f" ({r['note']})" if r.get("note") else ""
        lines.append(
            f"| {r['model']} | {_device(r)} | {r['mode']}{' +vision' if r.get('lora_vision') else ''} "
            f"| {'on' if r.get('checkpointing') else 'off'} "
            f"| {r['batch']} | {pred / 1e9:.2f} | {meas / 1e9 if meas else float('nan'):.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny | base | large | checkpoint folder")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes (default per model)")
    parser.add_argument("--modes", nargs="*", help="subset of: full full+ckpt frozen-encoder lora qlora; "
                        "lora+vision / qlora+vision adapt the vision tower too (--lora-vision)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="CUDA only")
    parser.add_argument("--out", type=Path, help="append each measurement to this JSONL file")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="print the table of saved measurements (one or more JSONL files), measure nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        rows = [json.loads(line) for path in args.from_json for line in path.read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    defaults = DEFAULTS.get(args.model, DEFAULTS["base"])
    configs = [(mode, ckpt, False) for mode, ckpt in CONFIGS]
    if args.modes:
        configs = [(m.split("+")[0], "+ckpt" in m, "+vision" in m) for m in args.modes]
    rows = []
    for mode, ckpt, lora_vision in configs:
        for batch in args.batches or defaults["batches"]:
            spec = {"model": args.model, "mode": mode, "batch": batch, "checkpointing": ckpt, "device": args.device,
                    **({"lora_vision": True} if lora_vision else {}),
                    "precision": args.precision if args.device == "cuda" else "fp32",
                    **({"optim": "paged-adamw8bit"} if mode == "qlora" and args.device == "cuda" else {}),
                    **{k: defaults[k] for k in ("image_size", "prompt", "target")}}
            row = measure(spec)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
