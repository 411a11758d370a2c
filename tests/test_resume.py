"""Checkpoints are atomic and rotated; a resumed run ends with the weights of an uninterrupted one.

Dropout is switched on in these tests' tiny model (0.1), so equality also proves the RNG state resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import verify_checkpoint

from florence_kit.common.errors import UserError
from florence_kit.train import checkpoints
from florence_kit.train.config import TrainConfig
from florence_kit.train.recipe import finetune
from florence_kit.train.runfolder import RunFolder


@pytest.fixture(scope="module")
def dropout_tiny(tiny_dir, tmp_path_factory) -> Path:
    """The session's tiny model with dropout 0.1 in the language model."""
    import shutil

    out = tmp_path_factory.mktemp("tiny_dropout") / "model"
    shutil.copytree(tiny_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["dropout"] = 0.1
    (out / "config.json").write_text(json.dumps(config))
    return out


def _cfg(model: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    settings = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "max_samples": 12, "lr": 1e-3, "log_every": 1,
                "save_every": 2, **overrides}
    return TrainConfig(task="docvqa", model=str(model), dataset=str(data), output_dir=out, **settings)


class Interrupt(Exception):
    pass


def _train(model_dir: Path, dataset, cfg: TrainConfig, stop_at: int | None = None,
           resume: Path | None = None) -> dict[str, torch.Tensor]:
    """train_loop on ``dataset`` (killed after step ``stop_at``, or resumed from ``resume``); its final weights."""
    from florence_kit.model.loading import load_model
    from florence_kit.train.loop import train_loop

    model, processor = load_model(str(model_dir))
    cfg.output_dir.mkdir(exist_ok=True)

    def on_step(step, total, loss, lr):
        if step == stop_at:
            raise Interrupt

    with contextlib.suppress(Interrupt):
        train_loop(model, processor, dataset, cfg, RunFolder(cfg.output_dir), on_step=on_step,
                   resume_from=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_in_process_equals_uninterrupted(dropout_tiny, docvqa_dir, docvqa_task, tmp_path, monkeypatch):
    """12 rows, 2 x 2 per step: 3 steps an epoch; interrupted at step 3, resumed from step-2 (mid-epoch 0)."""
    from florence_kit.data.dataset import TaskDataset, load_split

    split = load_split(docvqa_task, str(docvqa_dir), "train").select(range(12))
    dataset = TaskDataset(split, docvqa_task, with_target=True)

    def run(out: Path, stop_at: int | None = None, resume: Path | None = None) -> dict[str, torch.Tensor]:
        return _train(dropout_tiny, dataset, _cfg(dropout_tiny, docvqa_dir, out, max_steps=4, save_every=1),
                      stop_at, resume)

    straight = run(tmp_path / "a")
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "a")] == ["step-3", "step-4"]  # keep 2
    assert not list((tmp_path / "a" / "checkpoints").glob(".tmp-*"))
    run(tmp_path / "b", stop_at=3)
    latest = checkpoints.resolve_resume("latest", tmp_path / "b")
    assert latest.name == "step-2"
    state, _ = checkpoints.TrainState.from_file(latest / checkpoints.STATE_FILE)
    assert (state.step, state.epoch, state.batch) == (2, 0, 4)
    # the checkpoint holds the trainable weights only, by their plain (unwrapped) names
    assert set(load_file(str(latest / checkpoints.WEIGHTS_FILE))) == set(straight)
    resumed = run(tmp_path / "b", resume=latest)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)  # bit-identical on CPU
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "b")] == ["step-3", "step-4"]


def test_weighted_mix_moves_on_each_epoch_and_resumes_mid_epoch_exactly(dropout_tiny, docvqa_dir, docvqa_task,
                                                                        tmp_path, monkeypatch):
    """A mix of 10 + 2 examples weighted 1:1 (6 draws each an epoch): the 10-example task trains on 6 examples in
    epoch 0 and the other 4 first in epoch 1; resumed from step 5 (mid-epoch 1) it ends as the uninterrupted run."""
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.data.mixing import MixedDataset
    from florence_kit.train.runfolder import ImageGuard

    split = load_split(docvqa_task, str(docvqa_dir), "train").select(range(12))
    parts = [TaskDataset(split.select(range(10)), docvqa_task, with_target=True),
             TaskDataset(split.select(range(10, 12)), docvqa_task, with_target=True)]
    mixed = MixedDataset(parts, [1, 1], seed=0)
    seen: list[tuple[int, int]] = []
    read = MixedDataset.__getitem__
    monkeypatch.setattr(MixedDataset, "__getitem__", lambda self, i: seen.append(self.index[int(i)]) or read(self, i))

    def run(out: Path, stop_at: int | None = None, resume: Path | None = None) -> dict[str, torch.Tensor]:
        cfg = _cfg(dropout_tiny, docvqa_dir, out, max_steps=9, save_every=5, mix_weights="1,1")  # one checkpoint
        return _train(dropout_tiny, ImageGuard(mixed, range(12), skip=False), cfg, stop_at, resume)

    straight = run(tmp_path / "a")  # 3 epochs of 12 draws, 3 steps each
    epochs = [seen[k : k + 12] for k in (0, 12, 24)]
    assert len(seen) == 36
    first = [[i for t, i in e if t == 0] for e in epochs]
    assert [len(f) for f in first] == [6, 6, 6] and all(len(set(f)) == 6 for f in first)
    assert set(first[0] + first[1]) == set(range(10))  # every example before any repeats
    assert all(sorted(i for t, i in e if t == 1) == [0, 0, 0, 1, 1, 1] for e in epochs)
    seen.clear()
    run(tmp_path / "b", stop_at=6)
    latest = checkpoints.resolve_resume("latest", tmp_path / "b")
    state, _ = checkpoints.TrainState.from_file(latest / checkpoints.STATE_FILE)
    assert (state.step, state.epoch, state.batch) == (5, 1, 4)
    seen.clear()
    resumed = run(tmp_path / "b", resume=latest)
    assert seen == [*epochs[1][8:], *epochs[2]]  # the rest of epoch 1, then epoch 2, as in the uninterrupted run
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)  # bit-identical on CPU


def _model_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.fixture()
def one_thread():
    """The killed run is a subprocess with OMP_NUM_THREADS=1; the same here, so float sums run in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_then_resume_equals_uninterrupted(dropout_tiny, docvqa_dir, tmp_path, one_thread):
    """A real `florence-kit finetune` is killed with SIGKILL after a random checkpoint, then `--resume latest`."""
    target = random.choice([2, 4, 6])
    print(f"killing after checkpoint step-{target}")
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "florence_kit.cli", "finetune", "docvqa", "--model", str(dropout_tiny),
            "--dataset", str(docvqa_dir), "--output-dir", str(run_dir), "--max-steps", "10", "--batch-size", "2",
            "--grad-accum", "2", "--max-samples", "12", "--lr", "1e-3", "--save-every", "2",
            "--keep-checkpoints", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / f"step-{target}").is_dir():
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert not (run_dir / "model.safetensors").exists()
    on_disk = checkpoints.list_checkpoints(run_dir)
    assert on_disk and on_disk[-1].name.startswith("step-")
    for folder in on_disk:  # none is unreadable, whatever moment the kill hit
        verify_checkpoint(folder)

    cfg = _cfg(dropout_tiny, docvqa_dir, run_dir, max_steps=10, keep_checkpoints=3, log_every=10)  # as the CLI
    cfg.resume = "latest"  # the run folder is not empty: resuming it needs no --overwrite
    result = finetune(cfg, quiet=True, print_fn=lambda _: None)
    assert result.steps == 10
    straight = finetune(_cfg(dropout_tiny, docvqa_dir, tmp_path / "straight", max_steps=10), quiet=True,
                        print_fn=lambda _: None)
    a, b = _model_weights(run_dir), _model_weights(straight.output_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |resumed - uninterrupted| = {worst:.3g}")
    assert worst == 0.0
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 10]  # each logged step once, in order
    assert [r["step"] for r in log if r.get("event") == "resume"] == [int(on_disk[-1].name.removeprefix("step-"))]
    for folder in checkpoints.list_checkpoints(run_dir):
        verify_checkpoint(folder)


def test_resume_refuses_other_settings_and_missing_checkpoints(tiny_dir, docvqa_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no checkpoint in"):
        finetune(_cfg(tiny_dir, docvqa_dir, out, resume="latest"), quiet=True, print_fn=lambda _: None)
    finetune(_cfg(tiny_dir, docvqa_dir, out, max_steps=2, grad_accum=1), quiet=True, print_fn=lambda _: None)
    written = {name: (out / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(UserError, match="batch_size: 2 → 4"):
        finetune(_cfg(tiny_dir, docvqa_dir, out, max_steps=4, grad_accum=1, batch_size=4, resume="latest"),
                 quiet=True, print_fn=lambda _: None)
    with pytest.raises(UserError, match="data_order: None → 'image'"):  # another sampler: another epoch order
        finetune(_cfg(tiny_dir, docvqa_dir, out, max_steps=4, grad_accum=1, group_by_image=True, resume="latest"),
                 quiet=True, print_fn=lambda _: None)
    # refused before the run folder is touched: the run's config and log are as the run left them
    assert {name: (out / name).read_bytes() for name in written} == written
    with pytest.raises(UserError, match="not a checkpoint folder"):
        finetune(_cfg(tiny_dir, docvqa_dir, out, resume=str(tmp_path)), quiet=True, print_fn=lambda _: None)
    state_file = out / "checkpoints" / "step-2" / "trainer_state.json"  # written before "lr" was fingerprinted
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["lr"]
    state_file.write_text(json.dumps(state))
    result = finetune(_cfg(tiny_dir, docvqa_dir, out, max_steps=3, grad_accum=1, resume="latest"), quiet=True,
                      print_fn=lambda _: None)
    assert result.steps == 3


def test_resume_accepts_the_same_local_folders_typed_another_way(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    """Relative vs absolute paths and a trailing slash name the same --model/--dataset; another folder does not."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, "model")
    shutil.copytree(docvqa_dir, "data")
    out = tmp_path / "run"
    finetune(_cfg(Path("model"), Path("data"), out, max_steps=2, grad_accum=1, save_every=1), quiet=True,
             print_fn=lambda _: None)
    state_file = out / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"].update(model="model", dataset="data/")  # as typed, as checkpoints written before held them
    state_file.write_text(json.dumps(state))
    cfg = _cfg(tmp_path / "model", str(tmp_path / "data") + "/", out, max_steps=3, grad_accum=1, save_every=1,
               resume="latest")
    assert finetune(cfg, quiet=True, print_fn=lambda _: None).steps == 3
    fingerprint = json.loads((out / "checkpoints" / "step-3" / "trainer_state.json").read_text())["fingerprint"]
    assert fingerprint["model"] == str(tmp_path / "model")  # written resolved from now on
    shutil.copytree("data", "other")
    with pytest.raises(UserError, match="dataset: "):
        finetune(_cfg(Path("model"), Path("other"), out, max_steps=4, grad_accum=1, resume="latest"), quiet=True,
                 print_fn=lambda _: None)


@pytest.mark.parametrize(("change", "named"), [
    ({"lr": 1e-2}, "lr: 0.001 → 0.01"),  # the scheduler and optimizer states would bring the old rate back
    ({"weight_decay": 0.1}, "weight_decay: 0.0 → 0.1"),  # restored with the optimizer's param groups
    ({"lora_alpha": 64}, "lora_alpha: 32 → 64"),  # rescales every saved adapter update
])
def test_resume_refuses_a_setting_it_would_silently_ignore(tiny_dir, docvqa_dir, tmp_path, change, named):
    out = tmp_path / "run"
    base = {"max_steps": 2, "grad_accum": 1, "mode": "lora"}
    finetune(_cfg(tiny_dir, docvqa_dir, out, **base), quiet=True, print_fn=lambda _: None)
    with pytest.raises(UserError, match=named):
        finetune(_cfg(tiny_dir, docvqa_dir, out, **{**base, "max_steps": 4, **change}, resume="latest"),
                 quiet=True, print_fn=lambda _: None)


def test_eval_every_keeps_best_and_stops_early(tiny_dir, docvqa_dir, tmp_path):
    """With lr 0 the score can never improve: best stays at the first eval, patience 1 stops at the second."""
    from florence_kit.model.loading import load_model

    cfg = _cfg(tiny_dir, docvqa_dir, tmp_path / "run", max_steps=20, lr=0.0, save_every=0, eval_every=1,
               eval_max_samples=2, early_stopping_patience=1)
    result = finetune(cfg, quiet=True, print_fn=lambda _: None)
    assert result.steps == 2 and result.state.stopped_early
    assert result.state.best_step == 1 and result.state.evals_since_best == 1
    log = [json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval/anls" in r]
    assert [r["step"] for r in evals] == [1, 2] and len({r["eval/anls"] for r in evals}) == 1
    assert log[-1]["event"] == "early stopping"
    best = json.loads((cfg.output_dir / "best" / "eval.json").read_text())
    assert best["step"] == 1 and best["anls"] == evals[0]["eval/anls"]
    load_model(str(cfg.output_dir / "best"))  # a loadable model folder


def test_epoch_order_is_the_shuffled_dataloaders_rebuilt_from_the_seed():
    """Epoch e's order equals a shuffled DataLoader's e-th epoch (what the demo's numbers were measured with)."""
    from torch.utils.data import DataLoader

    from florence_kit.train.sampling import EpochShuffle

    loader = DataLoader(list(range(37)), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4))
    expected = [[i for batch in loader for i in batch.tolist()] for _ in range(4)]
    sampler = EpochShuffle(37, seed=4)
    for epoch in (3, 0, 2, 1):  # any epoch, in any order: nothing is replayed from the previous one
        sampler.set_epoch(epoch)
        assert list(sampler) == expected[epoch]
    assert expected[0] != expected[1]


def test_eval_every_keeps_the_lowest_error_rate_as_best(tiny_dir, docvqa_dir, tmp_path):
    """CER/WER are lower-is-better: the best model is the lowest one, and patience counts from it."""
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.model.loading import load_model
    from florence_kit.tasks.registry import get_task
    from florence_kit.train.checkpoints import TrainState
    from florence_kit.train.loop import train_loop

    model, processor = load_model(str(tiny_dir))
    task = get_task("docvqa")
    dataset = TaskDataset(load_split(task, str(docvqa_dir), "train"), task, with_target=True)
    scores = iter([0.5, 0.3, 0.4, 0.35, 0.2])
    best_calls: list[tuple[int, float]] = []
    cfg = _cfg(tiny_dir, docvqa_dir, tmp_path / "run", max_steps=5, lr=0.0, save_every=0, eval_every=1,
               early_stopping_patience=2)
    cfg.output_dir.mkdir(parents=True)
    state = TrainState()
    train_loop(model, processor, dataset, cfg, RunFolder(cfg.output_dir),
               evaluator=lambda _: ("cer", next(scores)), on_best=lambda _, step, v: best_calls.append((step, v)),
               state=state)
    assert best_calls == [(1, 0.5), (2, 0.3)]  # 0.4 and 0.35 are worse than 0.3
    assert state.best_step == 2 and state.best_metric == 0.3 and state.stopped_early  # stopped at step 4
    assert state.step == 4


def test_config_of_a_resumed_run_repeats_it_elsewhere(tiny_dir, docvqa_dir, tmp_path):
    """``--config RUN/config.yaml --output-dir NEW`` after RUN was resumed (with --overwrite): a fresh run, not a
    resume looking for checkpoints in NEW, nor one that overwrites NEW."""
    import yaml
    from typer.testing import CliRunner

    from florence_kit.cli import app

    run, new = tmp_path / "run", tmp_path / "new"
    finetune(_cfg(tiny_dir, docvqa_dir, run, max_steps=2, grad_accum=1, save_every=1), quiet=True,
             print_fn=lambda _: None)
    finetune(_cfg(tiny_dir, docvqa_dir, run, max_steps=3, grad_accum=1, save_every=1, resume="latest",
                  overwrite=True), quiet=True, print_fn=lambda _: None)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["resume"], config["overwrite"]) == (None, False)
    assert (config["run"]["resume"], config["run"]["overwrite"]) == ("latest", True)  # still on record
    result = CliRunner().invoke(app, ["finetune", "--config", str(run / "config.yaml"), "--output-dir", str(new)])
    assert result.exit_code == 0, result.output
    assert (new / "model.safetensors").is_file() and "resuming" not in result.output
    result = CliRunner().invoke(app, ["finetune", "--config", str(run / "config.yaml"), "--output-dir", str(new)])
    assert result.exit_code != 0 and "--overwrite" in result.output  # NEW is not overwritten unasked
