"""Two processes (DDP over gloo, on CPU) train the same model as one process with the same global batch.

The tiny model has no dropout (dropout 0 in its config), so the per-process RNG streams do not matter;
with the same seed both runs see the same global batches (one permutation per epoch, dealt out batch by
batch) and average the loss over the same target tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from florence_kit.train import TrainConfig, finetune


def test_two_process_ddp_equals_one_process(tiny_dir, docvqa_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--max-steps", "3", "--grad-accum", "2",
              "--lr", "1e-3", "--seed", "3", "--quiet"]
    ddp_dir = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "florence_kit.cli", "finetune", "docvqa", *common, "--batch-size", "2",
              "--output-dir", str(ddp_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("done:") == 1  # only the main process reports

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = finetune(
            TrainConfig(task="docvqa", model=str(tiny_dir), dataset=str(docvqa_dir), output_dir=tmp_path / "one",
                        max_steps=3, grad_accum=2, lr=1e-3, seed=3, batch_size=4, log_every=1),
            quiet=True, print_fn=lambda _: None,
        )
    finally:
        torch.set_num_threads(before)

    a, b = load_file(str(ddp_dir / "model.safetensors")), load_file(str(single.output_dir / "model.safetensors"))
    start = load_file(str(tiny_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((b[k] - start[k]).abs().max()) for k in b)
    print(f"max |2-process - 1-process| = {diff:.3g}; max change from the start = {moved:.3g}")
    # equal within float noise (gloo sums gradients in another order), a small fraction of what training moved
    assert diff <= 3e-5 and moved > 1e-3

    # only the main process wrote the log: one record per logged step, same losses as the single process
    ddp_log = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    one_log = {r["step"]: r for r in map(json.loads, (single.output_dir / "metrics.jsonl").read_text().splitlines())}
    assert [r["step"] for r in ddp_log] == [1, 3]  # log_every 10 from the CLI: the first and last step
    for record in ddp_log:
        assert abs(record["loss"] - one_log[record["step"]]["loss"]) < 1e-4
        assert record["samples"] == one_log[record["step"]]["samples"]
