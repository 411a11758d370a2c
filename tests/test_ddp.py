"""Two processes (DDP over gloo, on CPU) train the same model as one process with the same global batch.

The tiny model has no dropout (dropout 0 in its config), so the per-process RNG streams do not matter;
with the same seed both runs see the same global batches (one permutation per epoch, dealt out batch by
batch) and average the loss over the same target tokens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import relative_difference

from florence_kit.train.config import TrainConfig
from florence_kit.train.recipe import finetune


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
    # Gloo sums the two halves' gradients in another order than one process does, and kernels may block the
    # sums differently for batches of 2 and 4. Adam divides each gradient by its own running size, so where a
    # gradient is near rounding level its update can change by up to lr: compare each tensor's difference with
    # how far training moved it, not with an absolute number.
    lrs = [1e-3 * (1 - step / 3) for step in range(3)]  # linear decay to 0 over 3 steps, no warmup
    worst, where = max((relative_difference(a[k], b[k], start[k], k), k) for k in a)
    print(f"worst |2-process - 1-process| / |1-process - start| = {worst:.3g} ({where})")
    # float noise: <= 1e-4 measured with AVX-512, AVX2 and plain (SSE) kernels; the second process's half of each
    # batch dropped (or gradients not all-reduced): 0.76. 1e-2 leaves ~100x and ~75x margin.
    assert worst <= 1e-2
    # Adam moves a weight by at most ~lr a step (|m/sqrt(v)| <= 1.01 over 3 steps), in whatever direction:
    # the two runs can be no further apart than both moving the whole way in opposite directions
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 2 * 1.01 * sum(lrs)
    assert max(float((b[k] - start[k]).abs().max()) for k in b) > 0.5 * sum(lrs)  # training moved the weights

    # only the main process wrote the log: one record per logged step, same losses as the single process
    ddp_log = [json.loads(line) for line in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    one_log = {r["step"]: r for r in map(json.loads, (single.output_dir / "metrics.jsonl").read_text().splitlines())}
    assert [r["step"] for r in ddp_log] == [1, 3]  # log_every 10 from the CLI: the first and last step
    for record in ddp_log:
        # rounded to 6 decimals when logged (+-5e-7 each) and summed over the tokens in another order (a few
        # float32 ulps of a loss near 8, ~1e-6); half the data would change it by > 1e-2
        assert record["loss"] == pytest.approx(one_log[record["step"]]["loss"], abs=1e-5)
        assert record["samples"] == one_log[record["step"]]["samples"]


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def test_ctrl_c_reaching_one_ddp_process_stops_all_after_the_same_step(tiny_dir, docvqa_dir, tmp_path):
    """A SIGINT that reaches one process only (each gets its own, at its own moment): all processes agree
    to stop after the same step, the model at that step is saved, one message, exit code 130 from each."""
    import contextlib
    import signal
    import time

    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc to find the rank-1 process")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "florence_kit.cli", "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
              "--max-steps", "100000", "--batch-size", "2", "--quiet", "--output-dir", str(out)]
    proc = subprocess.Popen(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        log = out / "metrics.jsonl"
        while not (log.is_file() and log.read_text().strip()):  # step 1 logged: both processes are training
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        (rank1,) = [pid for pid in children if _rank_of(pid) == 1]
        os.kill(rank1, signal.SIGINT)  # rank 1 only: rank 0 learns of it through the agreement
        stdout, stderr = proc.communicate(timeout=120)  # a process stopping alone leaves the other one hanging
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, whatever happened
    # the first process to exit with 130 makes torchrun's agent SIGTERM the other one: both are past the save
    assert "exitcode  : 130" in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted (Ctrl-C) at step" in errors[0], stderr[-3000:]
    import yaml

    run = yaml.safe_load((out / "config.yaml").read_text())["run"]
    assert run["interrupted_at_step"] >= 1 and run["steps"] == run["interrupted_at_step"]
    load_file(str(out / "model.safetensors"))  # whole and readable


def _launch(tiny_dir: Path, data: Path, out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m florence_kit.cli finetune docvqa ...``; a hang fails the test at ``timeout``."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "florence_kit.cli", "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(data),
              "--quiet", "--output-dir", str(out), *args]
    return subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def test_two_processes_prepare_one_store_and_finish_an_odd_grouped_run(tiny_dir, docvqa_dir, tmp_path):
    """--prepare-data under DDP filled one store per process (process-0/, process-1/): every process decoded
    every image, N copies on disk. Now the main process fills it and the others read it back. The same run
    (7 examples on 2 processes of 2, grouped by page, vision features cached, evaluated and checkpointed)
    ends on both processes."""
    out = tmp_path / "run"
    done = _launch(tiny_dir, docvqa_dir, out, "--max-samples", "7", "--batch-size", "2", "--max-steps", "3",
                   "--prepare-data", "--group-by-image", "--mode", "frozen-encoder", "--cache-vision-features",
                   "--eval-every", "2", "--eval-max-samples", "2", "--save-every", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    stores = sorted(p.relative_to(out / "prepared") for p in (out / "prepared").rglob("*.u8"))
    assert len(stores) == 1 and stores[0].parent == Path("."), stores
    assert done.stdout.count("decoded and resized once") == 1 and "read back" not in done.stdout
    assert done.stdout.count("done:") == 1 and (out / "best" / "eval.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_an_error_is_printed_once_whether_every_process_or_one_raises_it(tiny_dir, docvqa_dir, tmp_path):
    """A non-empty --output-dir (every process refuses it) printed its error line once per process. An error that
    one process alone raises (the one that reads an unreadable image) must still be shown, and end the run."""
    import numpy as np
    from PIL import Image

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    done = _launch(tiny_dir, docvqa_dir, taken, "--max-steps", "1", timeout=180)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1 and "is not empty" in errors[0], done.stderr[-3000:]

    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(5):
        Image.fromarray(np.full((64, 64, 3), 200 + i, np.uint8)).save(data / f"good{i}.png")
        rows.append({"image": f"good{i}.png", "question": "What is it?", "answers": ["a page"]})
    (data / "cut.png").write_bytes(b"not an image")
    rows.insert(3, {"image": "cut.png", "question": "What is it?", "answers": ["a page"]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # --speed off: the per-batch path, where only the process whose batch holds the image reads it (the store's
    # one pass is the main process's, tested with the other shared-store errors)
    done = _launch(tiny_dir, data, tmp_path / "run", "--batch-size", "1", "--max-steps", "3", "--speed", "off",
                   timeout=180)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1 and "cut.png" in errors[0], done.stderr[-3000:]
    # with this seed the process that reads it is rank 1 (the one whose message waits), and it ends the run
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 2", done.stderr), done.stderr[-3000:]
