"""``--strategy fsdp``: FSDP2 over gloo on CPU shards the run and trains the same model as one process.

The tiny model has no dropout (dropout 0 in its config), so the per-process RNG streams do not matter;
with the same seed both runs see the same global batches and average the loss over the same target tokens
(as tests/test_ddp.py). Sharding changes only where each gradient element is summed and updated.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import relative_difference, verify_checkpoint

from florence_kit.train import checkpoints
from florence_kit.train.config import TrainConfig
from florence_kit.train.recipe import finetune

COMMON = ["--max-steps", "3", "--grad-accum", "2", "--lr", "1e-3", "--seed", "3", "--quiet"]
LRS = [1e-3 * (1 - step / 3) for step in range(3)]  # COMMON's schedule: linear decay to 0 over 3 steps, no warmup
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return ["-m", "florence_kit.cli", "finetune", "docvqa", *args]


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *_cli(*args)]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _one_process(tiny_dir: Path, data: Path, out: Path, **overrides) -> Path:
    """The same run in this process, one thread (the subprocesses' OMP_NUM_THREADS=1), global batch 4."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = {"max_steps": 3, "grad_accum": 2, "lr": 1e-3, "seed": 3, "batch_size": 4, **overrides}
        result = finetune(TrainConfig(task="docvqa", model=str(tiny_dir), dataset=str(data), output_dir=out,
                                      **settings), quiet=True, print_fn=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return result.output_dir


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """The worst tensor's |a - b| / |b - start| (L2, over entries with a gradient), after the bounds every run
    must meet; ``b`` is the one-process run."""
    assert a.keys() == b.keys()
    worst = max(relative_difference(a[k], b[k], start[k], k) for k in a)
    # Adam moves a weight by at most ~lr a step (|m/sqrt(v)| <= 1.01 over 3 steps), in whatever direction: two runs
    # can be no further apart than both moving the whole way in opposite directions
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 2 * 1.01 * sum(LRS)
    return worst


def test_two_process_fsdp_equals_one_process_and_each_rank_holds_half(tiny_dir, docvqa_dir, tmp_path):
    out = tmp_path / "fsdp"
    done = _run(_torchrun("--model", str(tiny_dir), "--dataset", str(docvqa_dir), *COMMON, "--batch-size", "2",
                          "--strategy", "fsdp", "--output-dir", str(out)))
    one = _one_process(tiny_dir, docvqa_dir, tmp_path / "one")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(one / "model.safetensors"))
    start = load_file(str(tiny_dir / "model.safetensors"))
    worst = _compare(a, b, start)
    print(f"worst |fsdp - 1-process| / |1-process - start| = {worst:.3g}")
    # float noise: gloo's reduce-scatter sums the halves' gradients in another order than one process's backward
    # (measured 1.7e-5 full, 1.8e-5 frozen-encoder); one process seeing half of each global batch (batch 2) ends
    # >= 0.16 off on every tensor, 0.66 on the worst (0.60 frozen-encoder). 1e-2: >500x above, 16x below.
    assert worst <= 1e-2
    assert max(float((b[k] - start[k]).abs().max()) for k in b) > 0.5 * sum(LRS)  # training moved the weights

    # the one line, printed once, and config.yaml's record: each rank holds about half of everything
    lines = [line for line in done.stdout.splitlines() if line.startswith("strategy:")]
    assert len(lines) == 1 and lines[0].startswith("strategy: fsdp (FSDP2"), done.stdout[-2000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["strategy"] == "fsdp"
    record = config["run"]["strategy"]
    assert record["name"] == "fsdp" and record["processes"] == 2 and record["backend"] == "gloo"
    n_params = sum(t.numel() for t in start.values() if True)
    for what in ("params", "grads", "optimizer"):
        local = [r[f"{what}_local"] for r in record["ranks"]]
        total = {r[f"{what}_total"] for r in record["ranks"]}
        assert len(total) == 1 and sum(local) == total.pop(), (what, record)
        # FSDP2 cuts every tensor's first dimension in two, rank 0 taking the odd row: within 1% of half
        assert all(abs(n / sum(local) - 0.5) < 0.01 for n in local), (what, local)
    assert record["ranks"][0]["params_total"] <= n_params  # the tied embedding counted once
    assert record["ranks"][0]["optimizer_total"] == 2 * record["ranks"][0]["params_total"]  # AdamW: m and v


def test_strategy_refusals_are_one_line(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    """What FSDP here does not run is refused before the model loads, exit 2, one line; never replicated."""
    from typer.testing import CliRunner

    from florence_kit.cli import app

    runner = CliRunner()

    def refused(*args: str) -> str:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                     "--max-steps", "1", "--output-dir", str(out), *args])
        assert result.exit_code == 2, result.output
        assert not out.exists()  # refused before anything was written
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        return lines[0]

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "this is one process" in refused("--strategy", "fsdp")
    assert "this is one process" in refused("--strategy", "ddp")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp --num_processes 1
    assert "FSDP (--use_fsdp)" in refused()
    assert "--strategy is ddp" in refused("--strategy", "ddp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before the process group is joined
    assert "DDP" in refused("--mode", "lora")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)  # the refused FSDP run above removed it already
    assert "--mode full or frozen-encoder" in refused("--strategy", "fsdp", "--mode", "qlora")
    assert "drop --cache-vision-features" in refused("--strategy", "fsdp", "--mode", "frozen-encoder",
                                                     "--cache-vision-features")
    assert "--compile" in refused("--strategy", "fsdp", "--compile")


@pytest.mark.slow
def test_frozen_encoder_fsdp_equals_one_process_and_evaluates(tiny_dir, docvqa_dir, tmp_path):
    """The frozen tower runs inside the sharded root (no feature cache); its weights stay as loaded, it holds no
    optimizer state, and --eval-every gathers the weights to score them and keep the best."""
    args = ["--mode", "frozen-encoder", "--eval-every", "2", "--eval-max-samples", "2"]
    out = tmp_path / "fsdp"
    done = _run(_torchrun("--model", str(tiny_dir), "--dataset", str(docvqa_dir), *COMMON, "--batch-size", "2",
                          "--strategy", "fsdp", "--output-dir", str(out), *args))
    assert "no feature cache: under --strategy fsdp" in " ".join(done.stdout.split())
    # one process would cache the tower's features and so group batches by page: the same batches need neither
    one = _one_process(tiny_dir, docvqa_dir, tmp_path / "one", mode="frozen-encoder", eval_every=2,
                       eval_max_samples=2, cache_vision_features=False)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(one / "model.safetensors"))
    start = load_file(str(tiny_dir / "model.safetensors"))
    vision = [k for k in a if k.startswith("model.vision_tower.")]
    assert vision and all(torch.equal(a[k], start[k]) for k in vision)  # frozen for real
    worst = _compare(a, b, start)
    print(f"frozen-encoder: worst |fsdp - 1-process| / |1-process - start| = {worst:.3g}")
    assert worst <= 1e-2  # as in full mode: float noise of the gradient sums, far below half the data's effect
    record = yaml.safe_load((out / "config.yaml").read_text())["run"]["strategy"]["ranks"]
    trainable = sum(t.numel() for k, t in start.items() if not k.startswith("model.vision_tower."))
    assert sum(r["optimizer_local"] for r in record) <= 2 * trainable  # nothing for the frozen tower
    # the same evaluations as one process: same score, same best step, a whole model in best/
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, one)]
    evals = [[(r["step"], round(r["eval/anls"], 4)) for r in log if "eval/anls" in r] for log in logs]
    assert evals[0] == evals[1] and len(evals[0]) == 1, evals
    assert (out / "best" / "eval.json").is_file()
    best = load_file(str(out / "best" / "model.safetensors"))
    assert best.keys() == a.keys()


def _rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_equals_uninterrupted(tiny_dir, docvqa_dir, tmp_path):
    """Every process SIGKILLed after checkpoint step-2 of 6; ``--resume latest`` under FSDP ends on the weights
    of the uninterrupted FSDP run, bit for bit (dropout on: each process's RNG state resumes too). The
    checkpoint holds whole tensors, as an unsharded run's does."""
    import shutil

    dropout = tmp_path / "dropout"
    shutil.copytree(tiny_dir, dropout)
    config = json.loads((dropout / "config.json").read_text())
    config["text_config"]["dropout"] = 0.1
    (dropout / "config.json").write_text(json.dumps(config))
    args = ["--model", str(dropout), "--dataset", str(docvqa_dir), "--max-steps", "6", "--batch-size", "2",
            "--max-samples", "12", "--lr", "1e-3", "--save-every", "2", "--keep-checkpoints", "3", "--quiet",
            "--strategy", "fsdp"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*args, "--output-dir", str(killed)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "step-2").is_dir():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks at once
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (killed / "model.safetensors").exists()  # killed, not finished
    on_disk = checkpoints.list_checkpoints(killed)
    assert on_disk
    for folder in on_disk:  # none is unreadable, whatever moment the kill hit
        verify_checkpoint(folder)
        state = torch.load(folder / "optimizer.bin", weights_only=False)
        assert len(state["state"]) == len(load_file(str(folder / "model.safetensors")))  # whole, every tensor

    resumed = _run(_torchrun(*args, "--output-dir", str(killed), "--resume", "latest"))
    assert "after resuming at step" in resumed.stdout
    straight = tmp_path / "straight"
    _run(_torchrun(*args, "--output-dir", str(straight)))
    a, b = load_file(str(killed / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |resumed - uninterrupted| = {worst:.3g} (resumed from {on_disk[-1].name})")
    assert a.keys() == b.keys() and worst == 0.0


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(tiny_dir, docvqa_dir, tmp_path):
    """torchrun --nnodes 2 (two launches on this host, one process each) trains what --nproc_per_node 2 does."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two_nodes = tmp_path / "nodes"
    args = ["--model", str(tiny_dir), "--dataset", str(docvqa_dir), *COMMON, "--batch-size", "2",
            "--strategy", "fsdp", "--output-dir", str(two_nodes)]
    launches = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                          "--master-addr", "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "1",
                          *_cli(*args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=300) for p in launches]
    finally:
        for p in launches:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for p, (stdout, stderr) in zip(launches, results, strict=True):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert sum(stdout.count("done:") for stdout, _ in results) == 1  # the main process of node 0 only
    one_node = tmp_path / "node"
    _run(_torchrun(*args[:-1], str(one_node)))
    a, b = load_file(str(two_nodes / "model.safetensors")), load_file(str(one_node / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |2 nodes - 1 node of 2| = {worst:.3g}")
    assert a.keys() == b.keys() and worst == 0.0  # the same ranks doing the same sums in the same order
    ranks = yaml.safe_load((two_nodes / "config.yaml").read_text())["run"]["strategy"]["ranks"]
    assert len(ranks) == 2 and all(abs(r["params_local"] / r["params_total"] - 0.5) < 0.01 for r in ranks)


@pytest.mark.slow
def test_accelerate_use_fsdp_runs_fsdp2_and_one_process_reads_the_result(tiny_dir, docvqa_dir, tmp_path):
    """``accelerate launch --use_fsdp`` on a machine without CUDA runs FSDP2 (Accelerate alone would run DDP);
    its run folder and checkpoint then load in one process: eval, export; --resume says why not."""
    from typer.testing import CliRunner

    from florence_kit.cli import app

    out = tmp_path / "run"
    done = _run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", "--use_fsdp",
                 *_cli("--model", str(tiny_dir), "--dataset", str(docvqa_dir), *COMMON, "--batch-size", "2",
                       "--save-every", "2", "--output-dir", str(out))], timeout=400)
    line = " ".join(done.stdout.split())
    assert "strategy: fsdp (FSDP2" in line and "asked by accelerate launch --use_fsdp" in line, done.stdout[-2000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["strategy"] == "fsdp" and config["run"]["strategy"]["asked_by"] == "accelerate launch --use_fsdp"

    runner = CliRunner()
    scored = runner.invoke(app, ["eval", "docvqa", "--model", str(out), "--dataset", str(docvqa_dir),
                                 "--max-samples", "2", "--output-dir", str(tmp_path / "eval")])
    assert scored.exit_code == 0, scored.output
    exported = runner.invoke(app, ["export", str(out), "--onnx", str(tmp_path / "onnx")])
    assert exported.exit_code == 0, exported.output
    saved = load_file(str(out / "model.safetensors"))
    step2 = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    assert step2.keys() <= saved.keys() and any(not torch.equal(step2[k], saved[k]) for k in step2)
    again = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                *COMMON, "--batch-size", "2", "--output-dir", str(out), "--resume", "latest"])
    assert again.exit_code == 2 and "processes: 2 → 1" in again.output, again.output
