"""``predict`` over many images: one ordered file, unreadable images listed, resumable after kill -9, the same file
from 2 processes or 2 machines as from 1, and auto-labelled datasets ``finetune`` trains on."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app

runner = CliRunner()
SHORT = ["--max-new-tokens", "6", "--quiet"]


def make_folder(root: Path, n: int = 12, broken: bool = True) -> Path:
    """``n`` small random images, a third of them in a nested folder, and (``broken``) four that cannot be read."""
    (root / "nested" / "deeper").mkdir(parents=True)
    for i in range(n):
        sub = root / "nested" / "deeper" if i % 3 == 0 else root
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (24 + 3 * i, 40, 3), dtype=np.uint8)).save(sub / f"im{i:03d}.png")
    if broken:
        (root / "zero.png").write_bytes(b"")
        (root / "text.jpg").write_bytes(b"not an image")
        Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(root / "cut.jpg")
        (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:200])
        png_bomb(root / "nested" / "bomb.png", 30000, 30000)
    return root


def png_bomb(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width × height: a decompression bomb to PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_becomes_one_ordered_file_with_the_one_image_answers(tiny_dir, tmp_path, one_thread):
    folder = make_folder(tmp_path / "imgs")
    out = tmp_path / "caps.jsonl"
    result = runner.invoke(app, ["predict", str(folder), "--task", "caption", "--model", str(tiny_dir),
                                 "--output", str(out), "--batch-size", "5", "--num-workers", "1", *SHORT])
    assert result.exit_code == 0, result.output
    assert "12 answered, 0 skipped as already done, 4 unreadable" in result.output
    records = lines(out)
    expected = sorted(str(p) for p in folder.rglob("*.png") if p.stat().st_size > 100)
    assert [r["path"] for r in records] == expected  # input order: the folder's sorted paths, nested included
    first = records[0]
    assert {"key", "path", "width", "height", "model", "task", "prompt", "text", "answer"} <= set(first)
    assert first["task"] == "caption" and first["prompt"] == "<CAPTION>" and first["answer"] == first["text"]
    assert (first["width"], first["height"]) == Image.open(first["path"]).size
    bad = {Path(r["path"]).name: r["error"] for r in lines(tmp_path / "caps.bad.jsonl")}
    assert set(bad) == {"zero.png", "text.jpg", "cut.jpg", "bomb.png"}
    assert "DecompressionBomb" in bad["bomb.png"] and "truncated" in bad["cut.jpg"].lower()
    assert not (tmp_path / "caps.jsonl.parts").exists()

    # the answers are those of one image at a time (batched with right padding, grouped by length)
    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.model.loading import load_model
    from florence_kit.tasks.registry import get_task

    net, processor = load_model(str(tiny_dir))
    config = generation_config_for(get_task("caption"), net, processor, max_new_tokens=6)
    for rec in records[::4]:
        alone = generate(net, processor, [Image.open(rec["path"]).convert("RGB")], ["<CAPTION>"], config)[0]
        assert rec["text"] == alone

    # the same command again: nothing to do, the file unchanged
    before = out.read_bytes()
    again = runner.invoke(app, ["predict", str(folder), "--task", "caption", "--model", str(tiny_dir),
                                "--output", str(out), *SHORT])
    assert again.exit_code == 0 and "0 answered, 16 skipped as already done" in again.output, again.output
    assert out.read_bytes() == before

    # another task over the same OUT: refused, then replaced with --overwrite
    other = ["predict", str(folder), "--task", "ocr", "--model", str(tiny_dir), "--output", str(out), *SHORT]
    refused = runner.invoke(app, other)
    assert refused.exit_code == 2 and "--overwrite" in refused.output and out.read_bytes() == before
    replaced = runner.invoke(app, [*other, "--overwrite"])
    assert replaced.exit_code == 0 and {r["task"] for r in lines(out)} == {"ocr"}


def test_kill_9_then_rerun_loses_and_duplicates_nothing(tiny_dir, tmp_path, one_thread):
    folder = make_folder(tmp_path / "imgs", n=40, broken=False)
    out = tmp_path / "out.jsonl"
    args = ["predict", str(folder), "--task", "caption", "--model", str(tiny_dir), "--output", str(out),
            "--batch-size", "2", "--max-new-tokens", "6", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "FLORENCE_KIT_PREDICT_CHUNK": "2"}
    command = [sys.executable, "-c", "from florence_kit.cli import main; main()", *args]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.monotonic() + 240
    while len(list(parts.glob("*.jsonl"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no chunk written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # the final file is complete or absent
    held = sum(len(lines(p)) for p in parts.glob("*.jsonl"))
    assert 0 < held < 40
    done = runner.invoke(app, args)  # the same command again (in-process: one interpreter start less)
    assert done.exit_code == 0, done.output
    assert f"{40 - held} answered, {held} skipped as already done" in done.output, done.output
    resumed = lines(out)
    whole = tmp_path / "whole.jsonl"
    assert runner.invoke(app, [a if a != str(out) else str(whole) for a in args]).exit_code == 0
    assert resumed == lines(whole)  # same records, same order: none lost, none twice
    assert len({r["key"] for r in resumed}) == 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_and_two_nodes_write_the_one_process_file(tiny_dir, tmp_path):
    folder = make_folder(tmp_path / "imgs", n=9)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}

    def args(out: Path) -> list[str]:
        return ["-m", "florence_kit.cli", "predict", str(folder), "--task", "caption", "--model", str(tiny_dir),
                "--output", str(out), "--batch-size", "2", "--max-new-tokens", "6", "--quiet"]

    run = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run([sys.executable, *args(tmp_path / "one.jsonl")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*run, "--standalone", "--nproc-per-node", "2", *args(tmp_path / "two.jsonl")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("predict:") == 1  # the main process reports
    port = str(_free_port())
    nodes = [subprocess.Popen([*run, "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                               "--master-port", port, "--nproc-per-node", "1", *args(tmp_path / "nodes.jsonl")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    reference = (tmp_path / "one.jsonl").read_bytes()
    assert len(lines(tmp_path / "one.jsonl")) == 9
    assert (tmp_path / "two.jsonl").read_bytes() == reference
    assert (tmp_path / "nodes.jsonl").read_bytes() == reference
    for name in ("one", "two", "nodes"):
        assert len(lines(tmp_path / f"{name}.bad.jsonl")) == 4


def test_auto_labelling_writes_datasets_finetune_reads(tiny_dir, tmp_path, one_thread):
    """``--format coco`` output trains ``finetune od`` unchanged; YOLO and florence-jsonl hold the same labels."""
    from florence_kit.data.dataset import load_source
    from florence_kit.evaluate.corpus import read_records
    from florence_kit.evaluate.labels import boxes_of, write_dataset

    folder = make_folder(tmp_path / "imgs", n=6)
    coco = tmp_path / "coco"
    result = runner.invoke(app, ["predict", str(folder), "--task", "od", "--model", str(tiny_dir), "--output",
                                 str(coco), "--format", "coco", "--max-new-tokens", "40", "--quiet"])
    assert result.exit_code == 0, result.output
    records = read_records(coco / "predictions.jsonl")
    boxes = [boxes_of(rec) for rec in records]
    assert len(records) == 6 and sum(map(len, boxes)) > 0  # the random model names some boxes
    loaded = load_source(str(coco))["train"]
    assert [len(row["objects"]["bbox"]) for row in loaded] == [len(b) for b in boxes]
    category = loaded.features["objects"]["category"]
    names = getattr(category, "feature", category).names
    first = next(i for i, b in enumerate(boxes) if b)
    x1, y1, x2, y2 = boxes[first][0][0]
    assert loaded[first]["objects"]["bbox"][0] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert names[loaded[first]["objects"]["category"][0]] == boxes[first][0][1]

    yolo = tmp_path / "yolo"
    write_dataset(yolo, "yolo", records)
    from_yolo = load_source(str(yolo))["train"]
    assert [len(row["objects"]["bbox"]) for row in from_yolo] == [len(b) for b in boxes]
    assert from_yolo[first]["objects"]["bbox"][0] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)

    jsonl = tmp_path / "fj"
    write_dataset(jsonl, "florence-jsonl", records, copy_images=True)
    rows = load_source(str(jsonl))["train"]
    assert [r["suffix"] for r in rows] == [rec["text"] for rec in records] and rows[0]["prefix"] == "<OD>"
    assert not (jsonl / "train" / Path(rows[0]["image"].filename).name).is_symlink()

    run = tmp_path / "run"
    trained = runner.invoke(app, ["finetune", "od", "--model", str(tiny_dir), "--dataset", str(coco), "--max-steps",
                                  "2", "--batch-size", "2", "--output-dir", str(run), "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert (run / "model.safetensors").is_file() and "done: 2 steps" in trained.output


def test_dataset_split_to_parquet_answers_as_eval(tiny_dir, docvqa_dir, tmp_path, one_thread):
    """--dataset with --split and --question-column, into Parquet: the rows in order, each page's questions asked
    together (the vision tower once per page), the answers eval gives the same rows."""
    from florence_kit.evaluate.corpus import read_records

    out = tmp_path / "answers.parquet"
    result = runner.invoke(app, ["predict", "--dataset", str(docvqa_dir), "--split", "validation", "--task", "docvqa",
                                 "--question-column", "question", "--model", str(tiny_dir), "--output", str(out),
                                 "--batch-size", "4", *SHORT])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    evaluated = runner.invoke(app, ["eval", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir),
                                    "--split", "validation", "--output-dir", str(tmp_path / "eval"), *SHORT])
    assert evaluated.exit_code == 0, evaluated.output
    scored = lines(tmp_path / "eval" / "predictions.jsonl")
    assert [r["row"] for r in records] == list(range(len(scored)))
    assert [r["text"] for r in records] == [r["prediction"] for r in scored]
    assert [r["prompt"] for r in records] == [r["prompt"] for r in scored]
    assert {(r["dataset"], r["split"]) for r in records} == {(str(docvqa_dir), "validation")}

    # a rerun over the Parquet file: nothing to do; another split over it: refused (its row numbers are others)
    again = runner.invoke(app, ["predict", "--dataset", str(docvqa_dir), "--split", "validation", "--task", "docvqa",
                                "--question-column", "question", "--model", str(tiny_dir), "--output", str(out),
                                *SHORT])
    assert again.exit_code == 0 and f"0 answered, {len(records)} skipped" in again.output, again.output
    other = runner.invoke(app, ["predict", "--dataset", str(docvqa_dir), "--split", "test", "--task", "docvqa",
                                "--question-column", "question", "--model", str(tiny_dir), "--output", str(out),
                                *SHORT])
    assert other.exit_code == 2 and "split 'validation' there, 'test' now" in other.output, other.output


def test_list_file_with_questions_and_bad_paths(tiny_dir, tmp_path, one_thread):
    """@list.jsonl: one image asked two questions gives two records; a listed file that is missing is unreadable."""
    folder = make_folder(tmp_path / "imgs", n=2, broken=False)
    listing = tmp_path / "list.jsonl"
    rows = [{"image": "imgs/im001.png", "question": "what is it?"}, {"image": "imgs/im001.png", "question": "why?"},
            {"image": "imgs/gone.png", "question": "where?"}]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "qa.jsonl"
    result = runner.invoke(app, ["predict", f"@{listing}", "--task", "docvqa", "--model", str(tiny_dir),
                                 "--output", str(out), *SHORT])
    assert result.exit_code == 0, result.output
    assert "2 answered, 0 skipped as already done, 1 unreadable" in result.output
    assert [r["prompt"] for r in lines(out)] == ["<DocVQA>what is it?", "<DocVQA>why?"]
    assert "gone.png" in lines(tmp_path / "qa.bad.jsonl")[0]["error"]
    assert folder.is_dir()


def test_a_streamed_dataset_in_blocks_gives_the_downloaded_answers(tiny_dir, docvqa_dir, tmp_path, monkeypatch,
                                                                  one_thread):
    """--streaming reads a hub dataset's rows in blocks (here of 3, from the local copy turned into a stream): the
    records equal those of the dataset read whole."""
    import datasets

    import florence_kit.data.dataset as dataset_module
    import florence_kit.evaluate.corpus as corpus

    args = ["predict", "--dataset", str(docvqa_dir), "--split", "validation", "--task", "docvqa",
            "--question-column", "question", "--model", str(tiny_dir), "--batch-size", "4", *SHORT]
    whole = runner.invoke(app, [*args, "--output", str(tmp_path / "whole.jsonl")])
    assert whole.exit_code == 0, whole.output
    local = datasets.load_from_disk(str(docvqa_dir))
    monkeypatch.setattr(dataset_module, "load_source", lambda source, name=None, streaming=False:
                        datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in local.items()}))
    monkeypatch.setattr(corpus, "STREAM_BLOCK", 3)
    streamed = runner.invoke(app, [*args, "--streaming", "--output", str(tmp_path / "streamed.jsonl")])
    assert streamed.exit_code == 0, streamed.output
    assert lines(tmp_path / "streamed.jsonl") == lines(tmp_path / "whole.jsonl")


@pytest.mark.slow
def test_speed_benchmark_runs_and_asserts_the_same_answers(tmp_path, one_thread):
    from benchmarks import predict_speed

    out = tmp_path / "speed.json"
    predict_speed.main(["--n", "8", "--batch-size", "4", "--num-workers", "0", "--max-new-tokens", "4",
                        "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["images"] == 8 and row["card_images_per_s"] > 0 and row["predict_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["predict_images_per_s"] / row["card_images_per_s"])


def test_text_answers_become_a_dataset_finetune_caption_reads(tiny_dir, tmp_path, one_thread):
    """``--format florence-jsonl`` on a caption task: each answer is a row's ``text`` (what ``finetune caption``
    trains on) and ``metadata.jsonl`` makes the folder an imagefolder ``datasets`` reads, with the same captions."""
    import datasets

    from florence_kit.data.dataset import TaskDataset, load_source
    from florence_kit.evaluate.corpus import read_records
    from florence_kit.tasks.registry import get_task

    folder = make_folder(tmp_path / "imgs", n=4, broken=False)
    out = tmp_path / "captions"
    result = runner.invoke(app, ["predict", str(folder), "--task", "caption", "--model", str(tiny_dir), "--output",
                                 str(out), "--format", "florence-jsonl", *SHORT])
    assert result.exit_code == 0, result.output
    records = read_records(out / "predictions.jsonl")
    captions = [rec["answer"] for rec in records]
    assert len(captions) == 4 and all(captions)
    rows = load_source(str(out))["train"]
    assert rows["text"] == captions and rows["suffix"] == captions and set(rows["prefix"]) == {"<CAPTION>"}
    trained_on = TaskDataset(rows, get_task("caption"), with_target=True)
    assert [trained_on[i].target for i in range(len(rows))] == captions
    folder_view = datasets.load_dataset("imagefolder", data_dir=str(out))["train"]
    assert folder_view["text"] == captions
    assert [im.size for im in folder_view["image"]] == [(rec["width"], rec["height"]) for rec in records]

    run = tmp_path / "run"
    trained = runner.invoke(app, ["finetune", "caption", "--model", str(tiny_dir), "--dataset", str(out),
                                  "--max-steps", "1", "--batch-size", "2", "--output-dir", str(run), "--quiet"])
    assert trained.exit_code == 0, trained.output
    assert (run / "model.safetensors").is_file() and "done: 1 steps" in trained.output
