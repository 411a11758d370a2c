"""The main job through the CLI: finetune → checkpoint → eval → score, predict, and the error catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.train.runfolder import RunFolder

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tiny_dir: Path, docvqa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "ft"
    result = runner.invoke(app, [
        "finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
        "--mode", "frozen-encoder", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--seed", "3",
        "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "length preflight: 0 of 24 examples exceed 1024 positions" in result.output
    assert "vision 0/" in result.output  # frozen-encoder: no trainable vision parameter
    return out


def test_finetune_writes_model_config_and_metrics(run_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["mode"] == "frozen-encoder" and config["max_steps"] == 2 and config["seed"] == 3
    assert config["versions"]["transformers"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all({"loss", "lr"} <= set(r) for r in lines)


def test_eval_writes_predictions_and_metrics(run_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(run_dir), "--dataset", str(docvqa_dir),
                                 "--output-dir", str(out), "--batch-size", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert metrics["n"] == len(preds) == 8 and metrics["n_scored"] == 8
    assert {"id", "prompt", "prediction", "references", "score"} <= set(preds[0])
    assert metrics["anls"] == pytest.approx(sum(p["score"] for p in preds) / len(preds))
    rescored = runner.invoke(app, ["score", "docvqa", str(out / "predictions.jsonl"), "--json"])
    assert json.loads(rescored.stdout)["anls"] == pytest.approx(metrics["anls"])


def test_eval_on_the_test_split_without_answers(run_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "docvqa", "--model", str(run_dir), "--dataset", str(docvqa_dir),
                                 "--split", "test", "--output-dir", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["n_scored"] == 0 and metrics["anls"] is None


OUTPUTS_SCRIPT = """
import json, sys, torch
from florence_kit.model.loading import load_model
from florence_kit.demo.synthetic_docvqa import demo_splits

def outputs(model, processor):
    rows = demo_splits(seed=0, n_train_docs=12, n_eval_docs=4, n_fields=2)["validation"]
    images = [r["image"].convert("RGB") for r in rows][:4]
    inputs = processor(images=images, text=["<DocVQA>" + q for q in rows["question"][:4]], return_tensors="pt",
                       padding="longest")
    model.eval()
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=torch.tensor([[2, 0, 20, 21]] * 4)).logits
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return {"logits": logits[:, -1, :50].tolist(), "ids": ids.tolist()}

if __name__ == "__main__":
    print(json.dumps(outputs(*load_model(sys.argv[1]))))
"""


def test_saved_model_reloads_in_a_fresh_process_with_the_same_outputs(
    tiny_dir: Path, docvqa_dir: Path, docvqa_task, tmp_path: Path
) -> None:
    from florence_kit.data.dataset import TaskDataset, load_split
    from florence_kit.model.checkpoint_io import save_checkpoint
    from florence_kit.model.loading import load_model
    from florence_kit.train.config import TrainConfig
    from florence_kit.train.loop import train_loop

    model, processor = load_model(str(tiny_dir))
    data = TaskDataset(load_split(docvqa_task, str(docvqa_dir), "train"), docvqa_task, with_target=True)
    cfg = TrainConfig(task="docvqa", model="", output_dir=tmp_path, max_steps=1, batch_size=4, lr=1e-3)
    train_loop(model, processor, data, cfg, RunFolder(tmp_path))
    save_checkpoint(model, processor, tmp_path / "ckpt")
    script = tmp_path / "outputs.py"
    script.write_text(OUTPUTS_SCRIPT)
    namespace: dict = {}
    exec(compile(OUTPUTS_SCRIPT, str(script), "exec"), namespace)
    in_memory = json.loads(json.dumps(namespace["outputs"](model, processor)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reloaded["ids"] == in_memory["ids"]
    flat = [x for row in in_memory["logits"] for x in row]
    got = [x for row in reloaded["logits"] for x in row]
    print(f"reloaded vs in-memory logits: max |diff| {max(abs(a - b) for a, b in zip(got, flat, strict=True)):.3g}, "
          f"max |logit| {max(map(abs, flat)):.3g}")
    # the same float32 weights; a fresh process may split its matrix products over another number of threads
    # (another summation order): a few ulps of logits below ~5. A weight that did not round-trip: > 1e-3.
    assert got == pytest.approx(flat, abs=1e-5)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["vision_config"]["model_type"]
    gen = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert (gen["decoder_start_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 2, 1)
    assert not gen.get("no_repeat_ngram_size")


def test_predict_answers_one_image(run_dir: Path, docvqa_splits, tmp_path: Path) -> None:
    image = tmp_path / "page.png"
    docvqa_splits["validation"][0]["image"].save(image)
    result = runner.invoke(app, ["predict", str(image), "--model", str(run_dir), "--question", "What is the total?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().isprintable()


def test_generation_settings_come_from_the_task_not_the_checkpoint(tiny_dir: Path, docvqa_task) -> None:
    from transformers import GenerationConfig

    from florence_kit.evaluate.generation import generation_config_for
    from florence_kit.model.loading import load_model

    model, processor = load_model(str(tiny_dir))
    model.generation_config = GenerationConfig(num_beams=3, no_repeat_ngram_size=3, early_stopping=True,
                                               max_length=20)  # what Microsoft's checkpoints ship
    cfg = generation_config_for(docvqa_task, model, processor)
    assert cfg.num_beams == 1 and not cfg.no_repeat_ngram_size and cfg.do_sample is False
    assert cfg.max_new_tokens == docvqa_task.generation["max_new_tokens"]
    assert cfg.decoder_start_token_id == 2 and cfg.eos_token_id == 2 and cfg.pad_token_id == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "nosuchtask", "--model", "MODEL"], "unknown task 'nosuchtask'"),
        (["finetune", "docvqa", "--model", "MODEL", "--batch-sise", "4"], "No such option"),
        (["finetune", "docvqa", "--model", "MODEL", "--mode", "lora-ish"], "Invalid value"),
        (["eval", "docvqa", "--model", "base", "--dataset", "DATA"], "offline"),
        (["eval", "docvqa", "--model", "NOTMODEL", "--dataset", "DATA"], "not a Florence-2 checkpoint"),
        (["eval", "docvqa", "--model", "MODEL"], "--dataset DIR"),
        (["predict", "NOTIMAGE", "--model", "MODEL", "--question", "q"], "cannot read image"),
    ],
)
def test_errors_exit_2_with_one_clear_line(args, message, tiny_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    (not_model / "config.json").write_text('{"model_type": "bert"}')
    not_image = tmp_path / "x.png"
    not_image.write_bytes(b"not an image")
    mapping = {"MODEL": str(tiny_dir), "DATA": str(docvqa_dir), "NOTMODEL": str(not_model), "NOTIMAGE": str(not_image)}
    args = [mapping.get(a, a) for a in args] + (["--output-dir", str(tmp_path / "o")] if args[0] != "predict" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_column_and_non_empty_output_dir(tiny_dir: Path, docvqa_splits, tmp_path: Path) -> None:
    data = tmp_path / "data"
    docvqa_splits.map(lambda r: r, remove_columns=["question"]).save_to_disk(str(data))
    out = tmp_path / "out"
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(data),
                                 "--output-dir", str(out), "--max-steps", "1"])
    assert result.exit_code == 2 and "question" in result.output
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(data),
                                 "--output-dir", str(out), "--max-steps", "1"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "precious"


def _two_task_folder(tmp_path: Path, docvqa_dir: Path) -> Path:
    """Two tasks of one group over the same local pages: different prompts, different metrics."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, prompt, metric in (("mine_anls", "<DocVQA>{question}", "anls"), ("mine_em", "{question}", "exact_match")):
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ngroup: mine\ndataset: {{path: {docvqa_dir}, eval_split: validation}}\n"
            f"prompt: \"{prompt}\"\ntarget: \"{{answers[0]}}\"\nreferences: answers\nmetric: {metric}\n"
        )
    return folder


def test_eval_of_a_group_scores_each_task_as_a_single_eval_would(
    run_dir: Path, docvqa_dir: Path, tmp_path: Path
) -> None:
    tasks = _two_task_folder(tmp_path, docvqa_dir)
    common = ["--model", str(run_dir), "--max-samples", "5", "--tasks-dir", str(tasks), "--quiet"]
    result = runner.invoke(app, ["eval", "mine", "--output-dir", str(tmp_path / "both"), *common])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())["tasks"]
    assert list(summary) == ["mine_anls", "mine_em"]
    assert summary["mine_em"]["metric"] == "exact_match" and summary["mine_anls"]["n"] == 5
    for name in summary:  # each task's folder holds what `eval NAME` alone writes
        alone = tmp_path / f"alone-{name}"
        assert runner.invoke(app, ["eval", name, "--output-dir", str(alone), *common]).exit_code == 0
        both = tmp_path / "both" / name
        assert (both / "predictions.jsonl").read_text() == (alone / "predictions.jsonl").read_text()
        assert json.loads((both / "metrics.json").read_text()) == json.loads((alone / "metrics.json").read_text())
        metric = summary[name]["metric"]
        assert summary[name]["value"] == json.loads((alone / "metrics.json").read_text())[metric]
    prompts = {json.loads(line)["prompt"].startswith("<DocVQA>")
               for name in summary for line in (tmp_path / "both" / name / "predictions.jsonl").open()}
    assert prompts == {True, False}  # each task kept its own prompt


def test_eval_of_several_tasks_checks_every_dataset_before_generating(
    run_dir: Path, docvqa_dir: Path, tmp_path: Path
) -> None:
    tasks = _two_task_folder(tmp_path, docvqa_dir)
    broken = (tasks / "mine_em.yaml").read_text().replace(str(docvqa_dir), str(tmp_path / "moved"))
    (tasks / "mine_em.yaml").write_text(broken)  # the second task's data is not there
    result = runner.invoke(app, ["eval", "mine", "--model", str(run_dir), "--tasks-dir", str(tasks),
                                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and "moved' does not exist" in result.output
    assert not (tmp_path / "out").exists()  # failed before the first task ran


def test_eval_of_several_tasks_refuses_one_dataset(run_dir: Path, docvqa_dir: Path, tmp_path: Path) -> None:
    tasks = _two_task_folder(tmp_path, docvqa_dir)
    result = runner.invoke(app, ["eval", "mine_anls,mine_em", "--model", str(run_dir), "--dataset", str(docvqa_dir),
                                 "--tasks-dir", str(tasks), "--output-dir", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--dataset names one task's data" in result.output
    assert not (tmp_path / "x").exists()


def test_predict_turns_a_photo_upright_as_its_exif_says(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A phone photo stored sideways with EXIF orientation 6 reaches the model upright, as eval's images do."""
    import datasets
    from PIL import Image

    import florence_kit.evaluate.generation

    stored = Image.new("RGB", (120, 60), "white")
    stored.paste((0, 0, 0), (0, 0, 30, 60))  # a black band on the left of the stored pixels
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    photo = tmp_path / "photo.jpg"
    stored.save(photo, exif=exif)
    upright = datasets.Image().decode_example({"path": str(photo), "bytes": None})  # what eval would see
    assert upright.size == (60, 120)

    seen = []

    def spy(model, processor, images, prompts, gen_config):
        seen.extend(images)
        return ["ok"]

    monkeypatch.setattr(florence_kit.evaluate.generation, "generate", spy)
    result = runner.invoke(app, ["predict", str(photo), "--model", str(run_dir), "--question", "What?"])
    assert result.exit_code == 0, result.output
    assert seen[0].size == upright.size
    assert list(seen[0].getdata()) == list(upright.convert("RGB").getdata())


def test_one_task_eval_into_a_several_task_folder_is_what_report_shows(
    run_dir: Path, docvqa_dir: Path, tmp_path: Path
) -> None:
    """`eval a,b` then `eval docvqa` into the same --output-dir (both default to runs/eval): the report is docvqa's."""
    from florence_kit.present.report import find_inputs

    tasks = _two_task_folder(tmp_path, docvqa_dir)
    out = tmp_path / "eval"
    common = ["--model", str(run_dir), "--tasks-dir", str(tasks), "--output-dir", str(out), "--quiet"]
    assert runner.invoke(app, ["eval", "mine", "--max-samples", "2", *common]).exit_code == 0
    assert (out / "summary.json").is_file()
    result = runner.invoke(app, ["eval", "docvqa", "--dataset", str(docvqa_dir), "--max-samples", "3", *common])
    assert result.exit_code == 0, result.output
    shown = find_inputs(out).evals
    assert [(run.metrics["task"], run.metrics["n"]) for run in shown] == [("docvqa", 3)]


def test_predict_on_a_decompression_bomb_is_one_error(run_dir: Path, tmp_path: Path) -> None:
    """PIL's DecompressionBombError is not an OSError: it used to end predict with a traceback."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # a header claiming 20000 x 20000 pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    result = runner.invoke(app, ["predict", str(bomb), "--model", str(run_dir), "--question", "What?"])
    assert result.exit_code == 2, result.output
    assert "cannot read image" in result.output and "decompression bomb" in result.output


def test_predict_without_task_asks_the_model_its_own_task(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """No --task: a run folder's (config.yaml) or an export's own single task; a mix, a group or a plain checkpoint
    falls back to docvqa; a typed --task wins."""
    import shutil

    from PIL import Image

    import florence_kit.evaluate.generation
    from florence_kit.cli.common import model_task

    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    image = tmp_path / "page.png"
    Image.new("RGB", (64, 64), "white").save(image)
    prompts: list[str] = []
    monkeypatch.setattr(florence_kit.evaluate.generation, "generate",
                        lambda model, processor, images, ps, gen_config: prompts.extend(ps) or ["ok"])

    def prompt_used(*extra: str) -> str:
        result = runner.invoke(app, ["predict", str(image), "--model", str(run), *extra])
        assert result.exit_code == 0, result.output
        return prompts[-1]

    assert prompt_used("--question", "What?").startswith("<DocVQA>")  # a checkpoint without config.yaml
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "caption"}))
    assert prompt_used() == "<CAPTION>"
    assert prompt_used("--task", "docvqa", "--question", "What?").startswith("<DocVQA>")
    for mixed in ("docvqa,caption", "cauldron", "no-such-task"):
        (run / "config.yaml").write_text(yaml.safe_dump({"task": mixed}))
        assert model_task(str(run), []) == "docvqa"
    export = tmp_path / "export"
    (export / "onnx").mkdir(parents=True)
    (export / "florence_kit_export.json").write_text(json.dumps({"task": "od", "variants": ["fp32"]}))
    assert model_task(str(export), []) == "od" and model_task("base", []) == "docvqa"
