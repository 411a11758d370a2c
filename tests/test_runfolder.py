"""The run folder: config.yaml round trip through --config, model card, progress lines, trackers, hub push."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.train.config import RECORD_KEYS, TrainConfig, apply_config_file

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def options(run: Path) -> dict:
    data = yaml.safe_load((run / "config.yaml").read_text())
    return {k: v for k, v in data.items() if k not in RECORD_KEYS}


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


class FakeHub:
    """Stands in for huggingface_hub.HfApi and records what would be sent."""

    calls: list[tuple[str, dict]] = []

    def whoami(self) -> dict:
        FakeHub.calls.append(("whoami", {}))
        return {"name": "me"}

    def create_repo(self, repo_id: str, **kwargs) -> str:
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs) -> None:
        FakeHub.calls.append(("upload_folder", kwargs))


@pytest.fixture()
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr("florence_kit.present.hub.is_offline", lambda: False)
    return FakeHub


@pytest.fixture(scope="module")
def run1(tiny_dir: Path, docvqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with many non-default options, from command-line options only."""
    out = tmp_path_factory.mktemp("runs") / "run1"
    result = runner.invoke(app, [
        "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
        "--mode", "frozen-encoder", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
        "--seed", "3", "--schedule", "cosine", "--warmup-steps", "1", "--max-samples", "8", "--weight-decay", "0.01",
        "--too-long", "truncate", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    return out


def test_config_round_trip_reproduces_the_run(run1: Path, tmp_path: Path) -> None:
    run2 = tmp_path / "run2"
    result = runner.invoke(app, ["finetune", "--config", str(run1 / "config.yaml"), "--output-dir", str(run2)])
    assert result.exit_code == 0, result.output
    first, second = options(run1), options(run2)
    assert first.pop("output_dir") == str(run1) and second.pop("output_dir") == str(run2)
    assert second == first  # every resolved option, exactly
    assert first["schedule"] == "cosine" and first["seed"] == 3 and first["lr"] == 1e-3
    w1, w2 = weights(run1), weights(run2)
    assert w1.keys() == w2.keys() and all((w1[k] == w2[k]).all() for k in w1)  # same seed, same data: same model


def test_command_line_overrides_the_file_and_trackers_and_push(
    run1: Path, tmp_path: Path, fake_hub: type[FakeHub]
) -> None:
    run3 = tmp_path / "run3"
    result = runner.invoke(app, ["finetune", "--config", str(run1 / "config.yaml"), "--output-dir", str(run3),
                                 "--seed", "5", "--max-steps", "1", "--report-to", "tensorboard",
                                 "--push-to-hub", "me/tiny-docvqa"])
    assert result.exit_code == 0, result.output
    first, third = options(run1), options(run3)
    changed = {k for k in first if first[k] != third[k]}
    assert changed == {"output_dir", "seed", "max_steps", "report_to", "push_to_hub"}
    assert (third["seed"], third["max_steps"], third["report_to"]) == (5, 1, "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run3 / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1]  # the tracker really got the training records
    # stdout is not a terminal here: plain progress lines with every field
    line = next(x for x in result.output.splitlines() if x.startswith("step 1/1"))
    for field in ("loss ", "lr ", "samples/s", "eta ", "mem ", "MiB"):
        assert field in line, line
    # the hub was asked before training (whoami first) and got model, processor and card after
    names = [name for name, _ in fake_hub.calls]
    assert names == ["whoami", "create_repo", "upload_folder"]
    sent = fake_hub.calls[-1][1]["allow_patterns"]
    assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md"} <= set(sent)
    assert "tensorboard" not in sent


def test_model_card(run1: Path) -> None:
    card = (run1 / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for text in ("`docvqa`", "`frozen-encoder`", "| steps | 2 ", "final training loss | ", "from_pretrained(",
                 "AutoProcessor", "8 training examples"):
        assert text in card, text
    run = yaml.safe_load((run1 / "config.yaml").read_text())["run"]
    assert run["steps"] == 2 and run["examples"] == 8 and f"{run['final_loss']:.4f}" in card


def test_push_command_sends_weights_processor_and_card_only(
    run1: Path, tmp_path: Path, fake_hub: type[FakeHub]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    (run / "optimizer.pt").write_bytes(b"pickle")
    (run / "checkpoint-1").mkdir()
    (run / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["push", str(run), "me/tiny", "--private"])
    assert result.exit_code == 0, result.output
    upload = fake_hub.calls[-1][1]
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(run)
    assert sorted(upload["allow_patterns"]) == sorted(
        p.name for p in run.iterdir() if p.is_file() and p.name != "optimizer.pt"
    )
    assert fake_hub.calls[1] == ("create_repo", {"repo_id": "me/tiny", "private": True, "exist_ok": True})


def test_push_offline_and_not_a_run(run1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["push", str(run1), "me/tiny"])
    assert result.exit_code == 2 and "offline" in result.output
    result = runner.invoke(app, ["push", str(tmp_path), "me/tiny"])
    assert result.exit_code == 2 and "not a finished run folder" in result.output


def finetune_context(args: list[str]):
    return get_command(app).commands["finetune"].make_context("finetune", args)


def test_unknown_key_is_an_error_with_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: docvqa\nlearning_rate: 1e-4\nbatch_sise: 4\n")
    cfg = TrainConfig(task="", model="base", output_dir=Path("x"))
    with pytest.raises(UserError, match="unknown option 'learning_rate'"):
        apply_config_file(cfg, path, finetune_context([]))
    path.write_text("task: docvqa\nbatch_sise: 4\n")
    with pytest.raises(UserError, match="did you mean 'batch_size'"):
        apply_config_file(cfg, path, finetune_context([]))


def test_file_values_are_validated_like_options(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    cfg = TrainConfig(task="", model="base", output_dir=Path("x"))
    path.write_text("task: docvqa\nmode: lora-ish\n")
    with pytest.raises(UserError, match="'mode'.*lora-ish"):
        apply_config_file(cfg, path, finetune_context([]))
    path.write_text("task: docvqa\nbatch_size: eight\n")
    with pytest.raises(UserError, match="'batch_size'.*eight"):
        apply_config_file(cfg, path, finetune_context([]))
    path.write_text("task: docvqa\nlr: 1e-4\nbatch_size: 4\ntasks_dirs: [a, b]\noutput_dir: out\n")
    cli = TrainConfig(task="", model="base", output_dir=Path("x"), batch_size=16)  # what the CLI parsed
    got = apply_config_file(cli, path, finetune_context(["--batch-size", "16"]))
    assert got.lr == 1e-4 and isinstance(got.lr, float)  # YAML reads 1e-4 as a string; the option type fixes it
    assert got.batch_size == 16  # typed on the command line: wins over the file
    assert got.tasks_dirs == [Path("a"), Path("b")] and got.output_dir == Path("out")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    cfg = TrainConfig(task="", model="base", output_dir=Path("x"))
    got = apply_config_file(cfg, path, finetune_context([]))
    assert got.task == "docvqa" and got.output_dir == Path("runs") / path.stem


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} >= {
        "docvqa-t4-frozen-encoder.yaml", "docvqa-t4-qlora.yaml", "docvqa-8gpu-full.yaml"
    }


def test_progress_plain_lines_every_n_steps() -> None:
    from florence_kit.train.progress import StepProgress

    lines: list[str] = []
    with StepProgress("t", samples_per_step=4, quiet=True, log_every=5, print_fn=lines.append) as bar:
        for step in range(1, 13):
            bar.update(step, 12, 1.0 / step, 1e-4)
    assert [x.split()[1] for x in lines] == ["1/12", "5/12", "10/12", "12/12"]
    assert "eta 0:00:00" in lines[-1] and "lr 1.00e-04" in lines[0] and "samples/s" in lines[0]


def test_progress_after_resume_times_only_the_steps_run_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run resumed at step 100 of 200: 2 s for its first 2 steps is 1 step/s, 98 steps (98 s) to go."""
    from florence_kit.train import progress

    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with progress.StepProgress("t", samples_per_step=8, quiet=True, print_fn=lambda _: None) as bar:
        bar.update(101, 200, 1.0, 1e-4)
        bar.update(102, 200, 1.0, 1e-4)
    assert bar.last["rate"] == pytest.approx(8.0)  # not the 100 skipped steps' 800 samples
    assert bar.last["eta"] == pytest.approx(98.0)


def test_progress_bar_in_a_terminal_shows_every_field() -> None:
    import io

    from rich.console import Console

    from florence_kit.train.progress import StepProgress

    screen, lines = io.StringIO(), []
    console = Console(file=screen, force_terminal=True, width=200, color_system=None)
    with StepProgress("t", samples_per_step=4, console=console, print_fn=lines.append) as bar:
        for step in range(1, 4):
            bar.update(step, 3, 0.5, 1e-4)
    assert not lines  # a terminal gets the bar, not plain lines
    last = screen.getvalue().split("\r")[-1]
    for field in ("3/3", "loss 0.5000", "lr 1.00e-04", "samples/s", "mem ", "MiB", "0:00:00"):
        assert field in last, last


def test_missing_tracker_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from florence_kit.train.trackers import check_report_to

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'florence-kit\[wandb\]'"):
        check_report_to("wandb")
    check_report_to("none")


def test_card_lists_eval_metrics_from_the_log(tmp_path: Path) -> None:
    from florence_kit.train.card import write_card

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.0, "lr": 0.1, "eval_anls": 0.75}\n'
        '{"step": 3, "loss": 0.5, "lr": 0.1}\n'
    )
    options = {"task": "docvqa", "model": "base", "mode": "full", "batch_size": 2, "grad_accum": 1}
    card = write_card(tmp_path, options, {"steps": 3, "final_loss": 0.5}).read_text()
    assert "| eval_anls | 0.75 |" in card and "| step | 2 |" in card
    assert "base_model: florence-community/Florence-2-base" in card


def test_card_metrics_ignore_events_and_skipped_steps(tmp_path: Path) -> None:
    """Early stopping or a resume after the last eval must not replace the eval scores on the card."""
    from florence_kit.train.card import write_card

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 4, "eval/anls": 0.5, "best": 0.5, "best_step": 4}\n'
        '{"step": 4, "event": "early stopping", "evals_without_improvement": 2}\n'
        '{"step": 4, "event": "resume", "checkpoint": "run/checkpoints/step-4"}\n'
        '{"step": 5, "loss": null, "skipped": "non-finite loss", "nonfinite_steps": 1}\n'
    )
    options = {"task": "docvqa", "model": "base", "mode": "full", "batch_size": 2, "grad_accum": 1}
    card = write_card(tmp_path, options, {"steps": 5, "final_loss": 0.5}).read_text()
    assert "| eval/anls | 0.5 |" in card and "| best_step | 4 |" in card
    for text in ("event", "resume", "checkpoint", "non-finite", "nonfinite_steps"):
        assert text not in card, text


def test_elapsed_s_goes_on_counting_after_a_resume(tiny_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    """metrics.jsonl's elapsed_s is the run's training time: a resume starts from the checkpoint's, not from 0."""
    import json

    from florence_kit.train.recipe import finetune

    out = tmp_path / "run"
    settings = {"task": "docvqa", "model": str(tiny_dir), "dataset": str(docvqa_dir), "output_dir": out,
                "batch_size": 2, "max_samples": 8, "log_every": 1, "save_every": 2}
    finetune(TrainConfig(max_steps=2, **settings), quiet=True, print_fn=lambda _: None)
    state_file = out / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["elapsed_s"] >= logged[-1]["elapsed_s"] > 0  # saved just after step 2 was logged
    state["elapsed_s"] = 1000.0  # as if the first two steps had taken a long time
    state_file.write_text(json.dumps(state))
    finetune(TrainConfig(max_steps=3, resume="latest", **settings), quiet=True, print_fn=lambda _: None)
    step3 = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert step3["step"] == 3 and step3["elapsed_s"] >= 1000.0


def test_overwrite_leaves_nothing_of_the_earlier_runs_model_or_logs(
    run1: Path, tiny_dir: Path, docvqa_dir: Path, tmp_path: Path
) -> None:
    """A lora run over a full run's folder: the old config.json made it load the old full model, not the adapter,
    and the old TensorBoard events were shown as the same run as the new ones."""
    from florence_kit.model.checkpoint_io import is_adapter_dir

    out = tmp_path / "run"
    shutil.copytree(run1, out)
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old")
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(out), "--mode", "lora", "--max-steps", "1", "--batch-size", "2",
                                 "--max-samples", "4", "--overwrite", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() and is_adapter_dir(out)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not (out / "tensorboard").exists()


def test_run_folder_reads_what_it_wrote_and_tolerates_what_a_crash_leaves(tmp_path: Path) -> None:
    """config.yaml swapped in whole (keys in their order), a torn metrics line skipped, a broken config empty."""
    from florence_kit.train.runfolder import RunFolder

    folder = RunFolder(tmp_path)
    assert not folder.is_run() and folder.config() == {} and folder.metrics() == [] and folder.tasks() == {}
    folder.write_config({"task": "caption", "lr": 0.001, "tasks_dirs": [str(tmp_path), str(tmp_path / "gone")]})
    assert folder.is_run() and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    written = f"task: caption\nlr: 0.001\ntasks_dirs:\n- {tmp_path}\n- {tmp_path}/gone\n"
    assert (tmp_path / "config.yaml").read_text() == written
    assert folder.tasks() == {"task": "caption", "tasks_dirs": [tmp_path]}  # a task folder since removed is left out
    ckpt = tmp_path / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    assert RunFolder.of_checkpoint(ckpt).config()["lr"] == 0.001
    for broken in ("task: [unclosed", "- a list\n- not options\n"):
        (tmp_path / "config.yaml").write_text(broken)
        assert folder.config() == {} and folder.tasks() == {}

    folder.start_metrics()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert folder.metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    folder.restart_metrics(1, ckpt)
    assert (tmp_path / "metrics.jsonl").read_text() == (
        f'{{"step": 1, "loss": 2.0}}\n{{"step": 1, "event": "resume", "checkpoint": "{ckpt}"}}\n'
    )
    assert folder.write_card("# card\n").read_text() == "# card\n" and folder.card_file == tmp_path / "README.md"


def test_model_task_reads_a_run_without_the_onnx_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict/serve asking a plain run folder for its task need not load the ONNX export code."""
    import sys

    from florence_kit.cli.common import model_task
    from florence_kit.train.runfolder import RunFolder

    monkeypatch.delitem(sys.modules, "florence_kit.present.onnx_export", raising=False)
    RunFolder(tmp_path).write_config({"task": "caption"})
    assert model_task(str(tmp_path), []) == "caption"
    assert "florence_kit.present.onnx_export" not in sys.modules
