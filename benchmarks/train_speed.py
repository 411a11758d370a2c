"""Training speed: florence-kit's train loop vs the reference loop, same model, data, batch size and steps.

    python -m benchmarks.train_speed                 # tiny (full) + base-sized 768 px (full, frozen-encoder)
    python -m benchmarks.train_speed --only tiny --tiny-steps 40
    python -m benchmarks.train_speed --commands --only tiny --tiny-modes frozen-encoder,full --tiny-steps 64 \
        --tiny-batch 6 --pages 12     # the command as typed vs the best flags vs the reference, whole processes

Every (configuration, loop) pair runs in a fresh subprocess, so peak RSS (``ru_maxrss``) is that run's own.
Both loops see the same synthetic DocVQA split saved in the public schema (pages rendered at 2048 px as PNG,
4 questions per page as in DocVQA), the same seed-identical random weights, batch size and number of optimizer
steps, two epochs in all. "samples/s, whole run" and the per-epoch rates count everything from the moment the
loop is called: florence-kit's ``--prepare-data`` pass (decode + resize every distinct page once) is charged
to its first epoch. "steady" leaves out the first step. "data" is the time the loop waits for its next batch,
"compute" is forward + backward + optimizer step.

florence-kit runs with ``--prepare-data``; ``florence-kit+cache`` (frozen-encoder) adds
``--cache-vision-features --group-by-image``.

Models: ``tiny`` is florence_kit.model.tiny (1.8 M parameters, 128 px: the data path dominates); ``base`` is a
Florence-2-base-sized random model built from its config (DaViT 128/256/512/1024, depths 1/1/9/1, BART
768-d 6+6 layers, vocab 51289) at 768 px, where the model dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

IMPLS = ("reference", "florence-kit")
CACHED = "florence-kit+cache"  # frozen-encoder only: --cache-vision-features

# Florence-2-base's DaViT and BART sizes (microsoft/Florence-2-base config.json), as florence_kit.model.tiny overrides.
BASE_OVERRIDES: dict[str, Any] = {
    "vocab_size": 51289,
    "d_model": 768,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 12,
    "decoder_attention_heads": 12,
    "encoder_ffn_dim": 3072,
    "decoder_ffn_dim": 3072,
    "vision_depths": (1, 1, 9, 1),
    "vision_embed_dim": (128, 256, 512, 1024),
    "vision_num_heads": (4, 8, 16, 32),
    "vision_num_groups": (4, 8, 16, 32),
    "vision_patch_size": (7, 3, 3, 3),
    "vision_patch_stride": (4, 2, 2, 2),
    "vision_patch_padding": (3, 1, 1, 1),
    "vision_patch_prenorm": (False, True, True, True),
    "vision_window_size": 12,
    "vision_mlp_ratio": 4.0,
    "vision_max_position_embeddings": 50,
}
BASE_IMAGE_SIZE = 768


# ----------------------------------------------------------------------------------------------- setup


PAGE_SIZE = 2048  # rendered page side: 4.2 MP, about a DocVQA scan (typically ~1700×2200, 3.7 MP)
QUESTIONS_PER_PAGE = 4  # DocVQA train: 39,463 questions on 10,194 pages (3.9 per page)


def prepare(root: Path, *, tiny_docs: int, base_docs: int, page_size: int = PAGE_SIZE,
            questions: int = QUESTIONS_PER_PAGE) -> dict[str, Path]:
    """Save the tiny model, the base-sized config + processor, and one data folder per model.

    Pages are rendered at ``page_size`` (PNG, as ``datasets.Image`` stores them) whatever the model's input
    size: decoding and resizing a real scan is the data path's cost, which a page pre-rendered at 128 px
    would hide.
    """
    from datasets import DatasetDict

    from florence_kit.demo.synthetic_docvqa import render_docvqa
    from florence_kit.model.tiny import build_processor, image_seq_length, save_tiny, tiny_config

    paths = {"tiny_model": root / "tiny", "base_model": root / "base", "tiny_data": root / "data128",
             "base_data": root / "data768"}
    save_tiny(paths["tiny_model"])
    config = tiny_config(**BASE_OVERRIDES)
    config.save_pretrained(paths["base_model"])  # weights are drawn in each worker from a fixed seed
    processor = build_processor(BASE_IMAGE_SIZE)
    seq = image_seq_length(BASE_IMAGE_SIZE, BASE_OVERRIDES["vision_patch_stride"])  # 577, as Florence-2-base
    processor.image_processor.image_seq_length = seq
    processor.image_seq_length = processor.image_processor.image_seq_length
    processor.save_pretrained(paths["base_model"])
    for kind, docs in (("tiny", tiny_docs), ("base", base_docs)):
        if docs:
            split = render_docvqa(docs, 0, n_fields=questions, image_size=page_size)
            DatasetDict({"train": split}).save_to_disk(str(paths[f"{kind}_data"]))
    return paths


def load_model(model_dir: Path, kind: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoProcessor, Florence2Config, Florence2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    if kind == "tiny":
        model = Florence2ForConditionalGeneration.from_pretrained(model_dir)
    else:
        torch.manual_seed(0)
        model = Florence2ForConditionalGeneration(Florence2Config.from_pretrained(model_dir))
    return model, processor


# ---------------------------------------------------------------------------------------------- worker


class Clock:
    """Step boundaries: ``batch`` when a batch is in hand, ``step`` when the optimizer step is done."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.batch_at: float | None = None
        self.rows: list[tuple[float, float]] = []  # (data wait, compute) per step
        self.cpu: list[float] = [time.process_time()]  # process CPU time at each step end: robust to contention

    def batch(self) -> None:
        self.batch_at = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        got = self.batch_at if self.batch_at is not None else self.last
        self.rows.append((got - self.last, now - got))
        self.last, self.batch_at = now, None
        self.cpu.append(time.process_time())


def run_reference(model: Any, processor: Any, data_dir: Path, args: argparse.Namespace, clock: Clock) -> list[float]:
    import datasets

    from benchmarks.reference_loop import freeze_vision_tower_like_the_blog, train_model

    if args.mode == "frozen-encoder":
        freeze_vision_tower_like_the_blog(model)  # the blog's no-op: the tower still trains

    def hook(event: str, step: int, loss: float) -> None:
        clock.batch() if event == "batch" else clock.step()

    train = datasets.load_from_disk(str(data_dir))["train"]
    return train_model(train, model, processor, epochs=10**6, batch_size=args.batch_size, max_steps=args.steps,
                       step_hook=hook)


def run_kit(model: Any, processor: Any, data_dir: Path, args: argparse.Namespace, clock: Clock) -> list[float]:
    import florence_kit.train.loop as train
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.tasks.registry import get_task

    task = get_task("docvqa")
    dataset = TaskDataset(load_split(task, str(data_dir), "train"), task, with_target=True)
    losses: list[float] = []
    original = train.forward_loss

    def timed_forward_loss(*a: Any, **kw: Any) -> Any:  # the batch is in hand when the loss is asked for
        clock.batch()
        return original(*a, **kw)

    def on_step(step: int, total: int, loss: float, lr: float) -> None:
        clock.step()
        losses.append(loss)

    train.forward_loss = timed_forward_loss
    with tempfile.TemporaryDirectory() as tmp:
        cached = args.impl == CACHED
        cfg = train.TrainConfig(task="docvqa", model="-", output_dir=Path(tmp), mode=args.mode, max_steps=args.steps,
                                batch_size=args.batch_size, lr=1e-6, log_every=10**6, prepare_data=True,
                                cache_vision_features=cached, group_by_image=cached)
        train.train_loop(model, processor, dataset, cfg, Path(tmp) / "metrics.jsonl", on_step=on_step)
    return losses


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(Path(args.model_dir), args.kind)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import datasets

    examples = datasets.load_from_disk(args.data_dir)["train"].num_rows
    torch.manual_seed(0)
    clock = Clock()  # from here on everything counts: a loop's setup (florence-kit: --prepare-data) included
    run = run_reference if args.impl == "reference" else run_kit
    losses = run(model, processor, Path(args.data_dir), args, clock)
    steady = clock.rows[1:] or clock.rows
    seconds = sum(d + c for d, c in steady)
    per_epoch = -(-examples // args.batch_size)  # steps per epoch
    ends = [clock.start + sum(d + c for d, c in clock.rows[: i + 1]) for i in range(len(clock.rows))]
    epochs = []
    for e in range(len(clock.rows) // per_epoch):
        begin = clock.start if e == 0 else ends[e * per_epoch - 1]
        epochs.append(per_epoch * args.batch_size / (ends[(e + 1) * per_epoch - 1] - begin))
    result = {
        "impl": args.impl, "kind": args.kind, "mode": args.mode, "steps": len(clock.rows),
        "batch_size": args.batch_size, "examples": examples,
        "total_samples_per_s": len(clock.rows) * args.batch_size / (ends[-1] - clock.start),
        "epoch_samples_per_s": epochs,
        "samples_per_s": len(steady) * args.batch_size / seconds,
        "data_s_per_step": sum(d for d, _ in steady) / len(steady),
        "compute_s_per_step": sum(c for _, c in steady) / len(steady),
        "samples_per_cpu_s": len(steady) * args.batch_size / (clock.cpu[-1] - clock.cpu[-1 - len(steady)]),
        "first_step_s": sum(clock.rows[0]), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_model_mb": rss_model, "losses": losses, "threads": torch.get_num_threads(),
    }
    Path(args.out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- parent


def run_one(
    impl: str, kind: str, mode: str, steps: int, batch: int, paths: dict[str, Path], tmp: Path, threads: int | None
) -> dict:
    out = tmp / f"{kind}-{mode}-{impl}.json"
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--worker", "--impl", impl, "--kind", kind,
           "--mode", mode, "--steps", str(steps), "--batch-size", str(batch),
           "--model-dir", str(paths[f"{kind}_model"]), "--data-dir", str(paths[f"{kind}_data"]), "--out", str(out)]
    cmd += ["--threads", str(threads)] if threads else []
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    """Rates include each loop's own setup (florence-kit's --prepare-data pass counts against its first epoch)."""
    lines = [
        "| model | mode | loop | batch | steps | samples/s, whole run | epoch 1 | epoch 2 | steady | data s/step "
        "| compute s/step | peak RSS MB | speed × | epoch 1 × | epoch 2 × | RSS × |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    refs = {(r["kind"], r["mode"]): r for r in results if r["impl"] == "reference"}

    def ratio(r: dict, ref: dict | None, key: str, index: int | None = None) -> str:
        if not ref:
            return "-"
        mine, theirs = (r[key], ref[key]) if index is None else (r[key][index:index + 1], ref[key][index:index + 1])
        if index is not None:
            if not mine or not theirs:
                return "-"
            mine, theirs = mine[0], theirs[0]
        return f"{mine / theirs:.2f}"

    for r in results:
        ref = refs.get((r["kind"], r["mode"]))
        epochs = list(r.get("epoch_samples_per_s", [])) + ["-", "-"]
        cells = [f"{e:.2f}" if isinstance(e, float) else e for e in epochs[:2]]
        lines.append(
            f"| {r['kind']} | {r['mode']} | {r['impl']} | {r['batch_size']} | {r['steps']} "
            f"| {r['total_samples_per_s']:.2f} | {cells[0]} | {cells[1]} | {r['samples_per_s']:.2f} "
            f"| {r['data_s_per_step']:.3f} | {r['compute_s_per_step']:.3f} | {r['peak_rss_mb']:.0f} "
            f"| {ratio(r, ref, 'total_samples_per_s')} | {ratio(r, ref, 'epoch_samples_per_s', 0)} "
            f"| {ratio(r, ref, 'epoch_samples_per_s', 1)} | {ratio(r, ref, 'peak_rss_mb')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ --commands: the command users type, whole process


def best_flags(mode: str) -> list[str]:
    """Every speed flag that serves ``mode`` (the feature cache and page grouping need a frozen vision tower)."""
    frozen = mode in ("frozen-encoder", "lora", "qlora")
    return ["--prepare-data", *(["--cache-vision-features", "--group-by-image"] if frozen else [])]


def save_base_weights(paths: dict[str, Path]) -> None:
    """The CLI reads weights from the folder: the same seed-0 random base-sized weights the workers draw."""
    model, _ = load_model(paths["base_model"], "base")
    model.save_pretrained(paths["base_model"])


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MB, output) of one whole process. The CPU seconds (user + system, its
    worker processes included) hardly change when other jobs share the machine; the wall seconds do."""
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.exists() else 0.0


def run_commands(kind: str, mode: str, steps: int, batch: int, paths: dict[str, Path], tmp: Path,
                 threads: int | None) -> list[dict]:
    """The reference loop, ``florence-kit finetune`` as typed (no speed flags) and with the best flags: three
    whole processes over the same data, weights, batch and steps; the disk is what the run folder holds after."""
    import yaml

    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    rows = []
    ref_json = tmp / f"cmd-{kind}-{mode}-reference.json"
    reference = [sys.executable, "-m", "benchmarks.train_speed", "--worker", "--impl", "reference", "--kind", kind,
                 "--mode", mode, "--steps", str(steps), "--batch-size", str(batch),
                 "--model-dir", str(paths[f"{kind}_model"]), "--data-dir", str(paths[f"{kind}_data"]),
                 "--out", str(ref_json), *(["--threads", str(threads)] if threads else [])]
    runs = [("reference loop", reference, None)]
    for label, extra in (("florence-kit (plain command)", []), ("florence-kit (best flags)", best_flags(mode))):
        out = tmp / f"cmd-{kind}-{mode}-{len(runs)}"
        runs.append((label, [sys.executable, "-m", "florence_kit.cli", "finetune", "docvqa",
                             "--model", str(paths[f"{kind}_model"]), "--dataset", str(paths[f"{kind}_data"]),
                             "--mode", mode, "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "1e-6",
                             "--quiet", "--output-dir", str(out), *extra], out))
    for label, cmd, out in runs:
        print(f"running {kind} {mode}: {label} ...", flush=True)
        wall, cpu, rss, text = timed(cmd, tmp / f"{kind}-{mode}-{len(rows)}.log", env)
        config = yaml.safe_load((out / "config.yaml").read_text()) if out else {}
        decision = config.get("run", {}).get("speed", {}).get("decision", "")  # the line, unwrapped
        rows.append({"kind": kind, "mode": mode, "run": label, "steps": steps, "batch_size": batch,
                     "wall_s": wall, "cpu_s": cpu, "samples_per_s": steps * batch / wall, "peak_rss_mb": rss,
                     "disk_mb": folder_mb(out / "prepared") + folder_mb(out / "vision_cache") if out else 0.0,
                     "decision": decision})
    return rows


def command_table(rows: list[dict]) -> str:
    """Speed ratios are time ratios (the same samples in each run): by wall time and by CPU time."""
    lines = ["| model | mode | run | steps × batch | wall s | CPU s | samples/s | × reference (wall, CPU) "
             "| plain ÷ best (wall, CPU) | peak RSS MB | store + cache MB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = [x for x in rows if x["kind"] == r["kind"] and x["mode"] == r["mode"]]
        ref, plain, best = same[0], same[1], same[2]
        vs_ref = f"{ref['wall_s'] / r['wall_s']:.2f}, {ref['cpu_s'] / r['cpu_s']:.2f}"
        vs_best = f"{best['wall_s'] / plain['wall_s']:.2f}, {best['cpu_s'] / plain['cpu_s']:.2f}" if r is plain else "-"
        lines.append(f"| {r['kind']} | {r['mode']} | {r['run']} | {r['steps']} × {r['batch_size']} | {r['wall_s']:.1f} "
                     f"| {r['cpu_s']:.1f} | {r['samples_per_s']:.2f} | {vs_ref} | {vs_best} | {r['peak_rss_mb']:.0f} "
                     f"| {r['disk_mb']:.1f} |")
    decisions = {r["decision"] for r in rows if r["decision"] and "plain command" in r["run"]}
    return "\n".join(lines + [""] + [f"plain command decided: {d}" for d in sorted(decisions)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("tiny", "base"), help="run one model size only")
    p.add_argument("--tiny-steps", type=int, default=30)
    p.add_argument("--tiny-batch", type=int, default=8)
    p.add_argument("--tiny-modes", default="full", help="comma-separated modes for the tiny model")
    p.add_argument("--base-modes", default="full,frozen-encoder", help="comma-separated modes for the base model")
    p.add_argument("--base-steps", type=int, default=8)
    p.add_argument("--base-batch", type=int, default=2)
    p.add_argument("--page-size", type=int, default=PAGE_SIZE, help="rendered page side in pixels")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's own); 1 on a shared machine")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--commands", action="store_true",
                   help="whole processes: the reference loop vs `florence-kit finetune` as typed vs with the best "
                   "speed flags (ratios from one run; peak RSS and the stores' disk use beside them)")
    p.add_argument("--pages", type=int, help="distinct pages per data set (default: two epochs' worth)")
    # worker-only arguments
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=(*IMPLS, CACHED), help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=("tiny", "base"), help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    plan = []
    if args.only in (None, "tiny"):
        plan += [("tiny", mode, args.tiny_steps, args.tiny_batch) for mode in args.tiny_modes.split(",")]
    if args.only in (None, "base"):
        plan += [("base", mode, args.base_steps, args.base_batch) for mode in args.base_modes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        # steps × batch = 2 epochs of QUESTIONS_PER_PAGE questions per page: every run covers two epochs, as
        # real fine-tuning runs several (the blog: 7)
        per_run = 2 * QUESTIONS_PER_PAGE
        paths = prepare(Path(tmp), tiny_docs=(args.pages or max(args.tiny_steps * args.tiny_batch // per_run, 1))
                        if args.only in (None, "tiny") else 0,
                        base_docs=(args.pages or max(args.base_steps * args.base_batch // per_run, 1))
                        if args.only in (None, "base") else 0, page_size=args.page_size)
        if args.commands:
            if args.only in (None, "base"):
                save_base_weights(paths)
            rows = [row for kind, mode, steps, batch in plan
                    for row in run_commands(kind, mode, steps, batch, paths, Path(tmp), args.threads)]
            pages = args.pages or "two epochs of"
            print(f"\n{pages} pages at {args.page_size} px, {QUESTIONS_PER_PAGE} questions each; cpu count: "
                  f"{os.cpu_count()}\n")
            print(command_table(rows))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
            return
        results = []
        for kind, mode, steps, batch in plan:
            for impl in (*IMPLS, CACHED) if mode == "frozen-encoder" else IMPLS:
                print(f"running {kind} {mode} {impl} ({steps} steps, batch {batch}) ...", flush=True)
                results.append(run_one(impl, kind, mode, steps, batch, paths, Path(tmp), args.threads))
    print(f"\ntorch threads: {results[0]['threads']}, cpu count: {os.cpu_count()}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
