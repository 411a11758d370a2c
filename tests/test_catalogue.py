"""The bad-input catalogue: the CLI driven with every kind of bad input we could think of.

Each case builds its bad input under tmp_path and runs ``florence-kit``. It must end with exit code 2
and exactly one ``error:`` line naming the problem (or, for click's own usage errors, click's message),
or be handled (exit 0: odd image modes converted, bad images skipped with a count and a warning);
never a traceback, and every file that existed before the run is byte-identical afterwards.
The tally is printed in pytest's terminal summary (see conftest.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app

runner = CliRunner()


@dataclass
class Env:
    """What a case builds its input from."""

    tmp: Path
    tiny: Path
    docvqa: Path
    monkeypatch: pytest.MonkeyPatch
    out: Path = field(init=False)
    check: Callable[[Env, str], None] | None = None
    may_change: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out = self.tmp / "out"

    def ft(self, *extra: str, data: Path | None = None, model: Path | None = None, task: str = "docvqa",
           batch: int = 2) -> list[str]:
        return ["finetune", task, "--model", str(model or self.tiny), "--dataset", str(data or self.docvqa),
                "--output-dir", str(self.out), "--max-steps", "1", "--batch-size", str(batch), "--quiet",
                "--mode", "frozen-encoder", *extra]  # frozen tower: no vision backward, the cheapest step

    def image_data(self, bad: Callable[[Path], str | None], n_good: int = 1, **row: object) -> Path:
        """A JSONL dataset folder: ``n_good`` fine rows, then one row whose image ``bad`` writes."""
        folder = self.tmp / "data"
        folder.mkdir(exist_ok=True)
        rows = []
        for i in range(n_good):
            Image.fromarray(np.full((64, 64, 3), 200 + i, np.uint8)).save(folder / f"good{i}.png")
            rows.append({"image": f"good{i}.png", "question": "What is it?", "answers": ["a page"]})
        name = bad(folder)
        if name is not None:
            rows.append({"image": name, "question": "What is it?", "answers": ["a page"], **row})
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder

    def rows_data(self, rows: list[dict], raw: bytes | None = None) -> Path:
        """A JSONL dataset of one image and the given rows (or raw bytes as the file)."""
        folder = self.tmp / "data"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), "white").save(folder / "page.png")
        body = raw if raw is not None else "".join(json.dumps({"image": "page.png", **r}) + "\n" for r in rows).encode()
        (folder / "train.jsonl").write_bytes(body)
        return folder

    def task_dir(self, files: dict[str, str]) -> Path:
        folder = self.tmp / "tasks"
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        return folder

    def model_dir(self, config: str | None, files: dict[str, bytes] | None = None) -> Path:
        folder = self.tmp / "model"
        folder.mkdir(exist_ok=True)
        if config is not None:
            (folder / "config.json").write_text(config)
        for name, data in (files or {}).items():
            (folder / name).write_bytes(data)
        return folder

    def earlier_run(self) -> Path:
        self.out.mkdir()
        for name in ("config.yaml", "model.safetensors", "config.json", "README.md"):
            (self.out / name).write_bytes(f"earlier {name}".encode())
        return self.out


@dataclass
class Case:
    kind: str
    build: Callable[[Env], list[str]]
    expect: str
    code: int = 2
    usage: bool = False  # click's own usage error (several lines), not our one-line error


CASES: list[Case] = []


def case(kind: str, expect: str, code: int = 2, usage: bool = False) -> Callable:
    def register(fn: Callable[[Env], list[str]]) -> Callable:
        CASES.append(Case(kind, fn, expect, code, usage))
        return fn

    return register


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def noise_jpeg(path: Path, mode: str = "RGB") -> None:
    arr = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, quality=95)


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width × height: enough for PIL's decompression-bomb check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def saved(env: Env, output: str) -> None:
    assert (env.out / "model.safetensors").is_file() and (env.out / "README.md").is_file(), output


def nothing_written(env: Env, output: str) -> None:
    assert not env.out.exists(), f"{env.out} was created"


# --- images -------------------------------------------------------------------------------------


@case("truncated JPEG", "row 1: image cannot be read")
def _(env: Env) -> list[str]:
    def bad(folder: Path) -> str:
        noise_jpeg(folder / "cut.jpg")
        data = (folder / "cut.jpg").read_bytes()
        (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
        return "cut.jpg"

    env.check = lambda e, out: ("or pass --skip-bad-images" in out and "cut.jpg)" in out) or pytest.fail(out)
    return env.ft(data=env.image_data(bad))


@case("zero-byte image file", "row 1: image cannot be read")
def _(env: Env) -> list[str]:
    return env.ft(data=env.image_data(lambda f: write(f / "empty.png", b"")))


@case("image file that is not an image", "row 1: image cannot be read")
def _(env: Env) -> list[str]:
    return env.ft(data=env.image_data(lambda f: write(f / "x.png", b"hello")))


@case("image file missing", "row 1: image cannot be read")
def _(env: Env) -> list[str]:
    return env.ft(data=env.image_data(lambda f: "nowhere.png"))


@case("20000x20000 image (decompression bomb)", "could be decompression bomb")
def _(env: Env) -> list[str]:
    return env.ft(data=env.image_data(lambda f: png_header_only(f / "bomb.png", 20000, 20000) or "bomb.png"))


@case("image column null", "holds no image")
def _(env: Env) -> list[str]:
    folder = env.rows_data([{"question": "q", "answers": ["a"]}])
    with (folder / "train.jsonl").open("a") as f:
        f.write(json.dumps({"image": None, "question": "q", "answers": ["a"]}) + "\n")
    return env.ft(data=folder)


@case("truncated JPEG with --skip-bad-images", "skipped 1 row(s) with unreadable images", code=0)
def _(env: Env) -> list[str]:
    def bad(folder: Path) -> str:
        noise_jpeg(folder / "cut.jpg")
        (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
        return "cut.jpg"

    env.check = saved
    return env.ft("--skip-bad-images", data=env.image_data(bad, n_good=2), batch=3)


@case("truncated JPEG read by a DataLoader worker process", "row 1: image cannot be read")
def _(env: Env) -> list[str]:
    def bad(folder: Path) -> str:
        noise_jpeg(folder / "cut.jpg")
        (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
        return "cut.jpg"

    return env.ft("--num-workers", "1", data=env.image_data(bad))


@case("truncated JPEG with --skip-bad-images in a worker process", "skipped 1 row(s) with unreadable images", code=0)
def _(env: Env) -> list[str]:
    def bad(folder: Path) -> str:
        noise_jpeg(folder / "cut.jpg")
        (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
        return "cut.jpg"

    env.check = saved
    return env.ft("--skip-bad-images", "--num-workers", "1", data=env.image_data(bad, n_good=2), batch=3)


@case("every image bad with --skip-bad-images", "none of the 2 training rows has a readable image")
def _(env: Env) -> list[str]:
    def bad(folder: Path) -> str:
        (folder / "a.png").write_bytes(b"")
        return "a.png"

    data = env.image_data(bad, n_good=0)
    with (data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"image": "missing.png", "question": "q", "answers": ["a"]}) + "\n")
    return env.ft("--skip-bad-images", data=data)


def _mode_case(kind: str, make: Callable[[Path], str]) -> None:
    @case(kind, "done: 1 steps", code=0)
    def _(env: Env) -> list[str]:
        env.check = saved
        return env.ft(data=env.image_data(make), batch=2)


_mode_case("CMYK JPEG", lambda f: noise_jpeg(f / "cmyk.jpg", "CMYK") or "cmyk.jpg")
_mode_case("RGBA PNG", lambda f: Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(f / "rgba.png") or "rgba.png")
_mode_case("16-bit grayscale PNG",
           lambda f: Image.fromarray(np.full((64, 64), 40000, np.uint16)).save(f / "i16.png") or "i16.png")
_mode_case("palette PNG with transparency", lambda f: _palette(f / "p.png"))
_mode_case("grayscale + alpha PNG", lambda f: Image.new("LA", (64, 64), (10, 128)).save(f / "la.png") or "la.png")
_mode_case("1-bit PNG", lambda f: Image.new("1", (64, 64), 1).save(f / "bit.png") or "bit.png")
_mode_case("32-bit float TIFF", lambda f: Image.fromarray(np.full((64, 64), 3e4, np.float32)).save(f / "f.tif")
           or "f.tif")
_mode_case("1x1 pixel image", lambda f: Image.new("RGB", (1, 1), "red").save(f / "dot.png") or "dot.png")


def _palette(path: Path) -> str:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.save(path, transparency=0)
    return path.name


# --- data ---------------------------------------------------------------------------------------


@case("missing column", "lacks column(s) ['question']")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"answers": ["a"]}]))


@case("empty answers list", "have no answer in column 'answers'")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"question": "q", "answers": ["a"]}, {"question": "q", "answers": []}]))


@case("None answers", "have no answer in column 'answers'")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"question": "q", "answers": None}, {"question": "q", "answers": ["a"]}]))


@case("answers not a list (a number)", "have no answer in column 'answers'")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"question": "q", "answers": 7}]))


@case("None question", "column 'question' is empty")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"question": "q", "answers": ["a"]}, {"question": None, "answers": ["a"]}]))


@case("non-UTF-8 text in JSONL", "line 1 is not UTF-8 text (byte 0xe9")
def _(env: Env) -> list[str]:
    line = json.dumps({"image": "page.png", "question": "Qu'est-ce que c'est?", "answers": ["caf\u00e9"]})
    return env.ft(data=env.rows_data([], raw=line.encode("latin-1").replace(b"\\u00e9", b"\xe9") + b"\n"))


@case("malformed JSONL line", "could not read dataset")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([], raw=b'{"image": "page.png", "question": "q", "answers": ["a"]}\n{"image": \n'))


@case("empty JSONL file", "could not read dataset")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([], raw=b""))


@case("dataset path missing", "does not exist")
def _(env: Env) -> list[str]:
    return env.ft(data=env.tmp / "no-such-data")


@case("dataset file of an unknown format", "is not parquet or JSONL")
def _(env: Env) -> list[str]:
    (env.tmp / "train.csv").write_text("image,question,answers\n")
    return env.ft(data=env.tmp / "train.csv")


@case("dataset folder with no data", "holds no dataset")
def _(env: Env) -> list[str]:
    (env.tmp / "empty").mkdir()
    (env.tmp / "empty" / "notes.txt").write_text("nothing")
    return env.ft(data=env.tmp / "empty")


@case("dataset without a train split", "has no split 'train'")
def _(env: Env) -> list[str]:
    folder = env.rows_data([{"question": "q", "answers": ["a"]}])
    (folder / "train.jsonl").rename(folder / "validation.jsonl")
    return env.ft(data=folder)


@case("answer longer than the model's positions with --too-long error", "exceed the model's 1024 positions")
def _(env: Env) -> list[str]:
    return env.ft("--too-long", "error", data=env.rows_data([{"question": "q", "answers": ["word " * 1500]}]))


@case("every example too long (dropped)", "no training examples left")
def _(env: Env) -> list[str]:
    return env.ft(data=env.rows_data([{"question": "q", "answers": ["word " * 1500]}]))


# --- tasks --------------------------------------------------------------------------------------

TASK = "task: mine\nprompt: '<DocVQA>{question}'\ntarget: '{answers[0]}'\nmetric: anls\ndataset: {path: x}\n"


@case("unknown task", "unknown task 'docvqaa'; did you mean docvqa")
def _(env: Env) -> list[str]:
    return env.ft(task="docvqaa")


@case("task file with bad YAML", "not valid YAML")
def _(env: Env) -> list[str]:
    return env.ft("--tasks-dir", str(env.task_dir({"mine.yaml": "task: mine\nprompt: [unclosed\n"})), task="mine")


@case("task file with an unknown metric", "unknown metric 'bleu9'")
def _(env: Env) -> list[str]:
    tasks = env.task_dir({"mine.yaml": TASK.replace("anls", "bleu9")})
    return env.ft("--tasks-dir", str(tasks), task="mine")


@case("task file with an unknown key", "unknown key(s) ['promt']")
def _(env: Env) -> list[str]:
    return env.ft("--tasks-dir", str(env.task_dir({"mine.yaml": TASK + "promt: x\n"})), task="mine")


@case("task file missing a required field", "missing required field 'prompt'")
def _(env: Env) -> list[str]:
    text = "\n".join(x for x in TASK.splitlines() if not x.startswith("prompt"))
    return env.ft("--tasks-dir", str(env.task_dir({"mine.yaml": text})), task="mine")


@case("task include cycle", "include cycle")
def _(env: Env) -> list[str]:
    tasks = env.task_dir({"mine.yaml": "include: _a.yaml\n" + TASK, "_a.yaml": "include: _b.yaml\n",
                          "_b.yaml": "include: _a.yaml\n"})
    return env.ft("--tasks-dir", str(tasks), task="mine")


@case("task file running code via a YAML tag", "not valid YAML")
def _(env: Env) -> list[str]:
    sentinel = env.tmp / "pwned"
    tasks = env.task_dir({"evil.yaml": f"task: !!python/object/apply:os.system ['touch {sentinel}']\n"})
    env.check = lambda e, out: not sentinel.exists() or pytest.fail("YAML tag ran code")
    return env.ft("--tasks-dir", str(tasks), task="evil")


@case("task defined twice", "task 'docvqa' is defined twice")
def _(env: Env) -> list[str]:
    return env.ft("--tasks-dir", str(env.task_dir({"dup.yaml": TASK.replace("mine", "docvqa")})))


@case("--tasks-dir that does not exist", "does not exist")
def _(env: Env) -> list[str]:
    return env.ft("--tasks-dir", str(env.tmp / "nope"))


# --- models -------------------------------------------------------------------------------------


@case("model folder that is not Florence-2", "is not a Florence-2 checkpoint (model_type is 'bert'")
def _(env: Env) -> list[str]:
    return env.ft(model=env.model_dir('{"model_type": "bert"}'))


@case("model folder missing", "does not exist")
def _(env: Env) -> list[str]:
    return env.ft(model=env.tmp / "no-model")


@case("model config.json not JSON", "is not valid JSON")
def _(env: Env) -> list[str]:
    return env.ft(model=env.model_dir("{model_type: florence2"))


@case("model folder without config.json", "no config.json")
def _(env: Env) -> list[str]:
    return env.ft(model=env.model_dir(None, {"model.safetensors": b""}))


@case("model path is a file", "is a file")
def _(env: Env) -> list[str]:
    (env.tmp / "model.bin").write_bytes(b"x")
    return env.ft(model=env.tmp / "model.bin")


@case("model with pickled weights and remote code only", "convert it once: florence-kit convert")
def _(env: Env) -> list[str]:
    sentinel = env.tmp / "pwned"
    config = json.loads((env.tiny / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    folder = env.model_dir(json.dumps(config), {
        "pytorch_model.bin": b"not really a pickle",
        "modeling_evil.py": f"open({str(sentinel)!r}, 'w').write('ran')\n".encode(),
    })
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (env.tiny / name).exists():
            (folder / name).write_bytes((env.tiny / name).read_bytes())
    env.check = lambda e, out: not sentinel.exists() or pytest.fail("remote code ran")
    return env.ft(model=folder)


@case("ONNX export without its record and decoder graph", "an incomplete ONNX export")
def _(env: Env) -> list[str]:
    folder = env.model_dir(None, {name: (env.tiny / name).read_bytes() for name in ("config.json", "tokenizer.json")})
    (folder / "onnx").mkdir()
    for graph in ("vision_encoder", "embed_tokens", "encoder_model"):
        (folder / "onnx" / f"{graph}.onnx").write_bytes(b"graph")
    image = env.tmp / "page.png"
    Image.new("RGB", (64, 64), "white").save(image)
    return ["predict", str(image), "--model", str(folder), "--question", "What is it?"]


@case("hub model while offline", "offline")
def _(env: Env) -> list[str]:
    return env.ft()[:2] + ["--model", "base"] + env.ft()[4:]


# --- convert (Microsoft-format checkpoints and adapters) ------------------------------------------

MS_FIXTURE = Path(__file__).parent / "fixtures" / "ms_florence"


def ms_copy(env: Env) -> Path:
    """A copy of the recorded Microsoft-format checkpoint, to break."""
    import shutil

    return Path(shutil.copytree(MS_FIXTURE / "model", env.tmp / "ms"))


@case("convert: weights without the language model's embeddings", "lack the language model's token embeddings")
def _(env: Env) -> list[str]:
    from safetensors.torch import load_file, save_file

    src = ms_copy(env)
    state = load_file(str(src / "model.safetensors"))
    kept = {k: v for k, v in state.items() if not k.endswith(("shared.weight", "embed_tokens.weight"))}
    assert len(kept) < len(state)
    save_file(kept, str(src / "model.safetensors"))
    env.check = nothing_written
    return ["convert", str(src), str(env.out)]


@case("convert: config.json not UTF-8", "is not UTF-8 text")
def _(env: Env) -> list[str]:
    src = ms_copy(env)
    config = (src / "config.json").read_text()
    (src / "config.json").write_bytes(config.encode("utf-16"))
    env.check = nothing_written
    return ["convert", str(src), str(env.out)]


@case("convert: damaged --base safetensors", "is truncated or damaged")
def _(env: Env) -> list[str]:
    base = env.tmp / "base"
    base.mkdir()
    (base / "config.json").write_bytes((env.tiny / "config.json").read_bytes())
    weights = (env.tiny / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    env.check = nothing_written
    return ["convert", str(MS_FIXTURE / "adapter"), str(env.out), "--base", str(base)]


# --- output folder ------------------------------------------------------------------------------


@case("output dir exists and is not a run", "is not empty and is not a florence-kit run folder; pass --overwrite")
def _(env: Env) -> list[str]:
    env.out.mkdir()
    (env.out / "thesis.tex").write_text("precious")
    return env.ft()


@case("output dir holds an earlier run", "is not empty: it holds an earlier run; pass --overwrite")
def _(env: Env) -> list[str]:
    env.earlier_run()
    return env.ft()


@case("output dir is a file", "is a file")
def _(env: Env) -> list[str]:
    env.out.write_text("x")
    return env.ft()


def _disk_full(env: Env) -> None:
    from transformers import PreTrainedModel

    def full(self, save_directory, *args, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"half a tens")
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)


@case("full disk while saving the model", "No space left on device")
def _(env: Env) -> list[str]:
    _disk_full(env)

    def intact(e: Env, out: str) -> None:
        assert not (e.out / "model.safetensors").exists(), "a half-written model was left behind"
        assert not list(e.out.glob(".saving-*")), "the temporary folder was left behind"

    env.check = intact
    return env.ft()


@case("full disk while saving over an earlier run (--overwrite)", "nothing there was replaced")
def _(env: Env) -> list[str]:
    _disk_full(env)
    before = (env.earlier_run() / "model.safetensors").read_bytes()
    env.check = lambda e, out: (e.out / "model.safetensors").read_bytes() == before or pytest.fail("weights lost")
    env.may_change = {env.out / "config.yaml"}  # --overwrite: the new run's options replace the earlier ones
    return env.ft("--overwrite")


@case("full disk while writing config.yaml", "disk full")
def _(env: Env) -> list[str]:
    import florence_kit.train.recipe as train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr(train, "write_config", full)
    return env.ft()


# --- generation past the model's position table ------------------------------------------------

SHORT_TABLE = 48  # decoder and encoder positions of the model below (a docvqa task asks for 64 new tokens)


def short_table_model(env: Env) -> Path:
    """A tiny model with 48 positions whose answers never end (</s> suppressed): every answer runs to the cap."""
    import torch
    from transformers import Florence2ForConditionalGeneration, GenerationConfig

    from florence_kit.model.tiny import build_processor, reinit_default, tiny_config

    folder = env.tmp / "short-table"
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(tiny_config(max_position_embeddings=SHORT_TABLE))
    reinit_default(model)
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                               decoder_start_token_id=2, suppress_tokens=[2])
    model.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder


def short_question_data(env: Env) -> Path:
    """One short question (the image's tokens and it fit in 48 positions), as the train and validation split."""
    folder = env.rows_data([{"question": "What is it?", "answers": ["a page"]}])
    (folder / "validation.jsonl").write_bytes((folder / "train.jsonl").read_bytes())
    return folder


@case("eval: a task's answer length past the decoder's positions is capped", "answers are capped at 48", code=0)
def _(env: Env) -> list[str]:
    return ["eval", "docvqa", "--model", str(short_table_model(env)), "--dataset", str(short_question_data(env)),
            "--split", "train", "--output-dir", str(env.out), "--quiet"]


@case("eval --max-new-tokens past the decoder's positions", "--max-new-tokens 100 is more than this model")
def _(env: Env) -> list[str]:
    env.check = nothing_written
    return ["eval", "docvqa", "--model", str(short_table_model(env)), "--dataset", str(short_question_data(env)),
            "--split", "train", "--output-dir", str(env.out), "--max-new-tokens", "100"]


@case("predict: a task's answer length past the decoder's positions is capped", "answers are capped at 48", code=0)
def _(env: Env) -> list[str]:
    folder = short_question_data(env)
    return ["predict", str(folder / "page.png"), "--task", "docvqa", "--model", str(short_table_model(env)),
            "--question", "What is it?"]


@case("predict: a question longer than the encoder's positions", "shorten the question")
def _(env: Env) -> list[str]:
    folder = short_question_data(env)
    return ["predict", str(folder / "page.png"), "--task", "docvqa", "--model", str(short_table_model(env)),
            "--question", "What is written in the second paragraph of this page?"]


def _images(env: Env, n: int = 1) -> Path:
    folder = env.tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(folder / f"im{i}.png")
    return folder


def _many(env: Env, *inputs: str, task: str = "caption", out: Path | None = None) -> list[str]:
    return ["predict", *inputs, "--task", task, "--model", str(env.tiny), "--output", str(out or env.tmp / "o.jsonl"),
            "--max-new-tokens", "4", "--quiet"]


@case("predict: several images without --output", "several inputs need --output")
def _(env: Env) -> list[str]:
    folder = _images(env, 2)
    return ["predict", str(folder / "im0.png"), str(folder / "im1.png"), "--model", str(env.tiny)]


@case("predict: an input path that does not exist", "input 'nowhere' does not exist")
def _(env: Env) -> list[str]:
    return _many(env, "nowhere")


@case("predict: a glob that matches nothing", "matches no file")
def _(env: Env) -> list[str]:
    return _many(env, str(env.tmp / "*.png"))


@case("predict: --output neither .jsonl nor .parquet", "must end in .jsonl or .parquet")
def _(env: Env) -> list[str]:
    return _many(env, str(_images(env)), out=env.tmp / "answers.csv")


@case("predict: a question task over files without a question", "needs a question")
def _(env: Env) -> list[str]:
    return _many(env, str(_images(env)), task="docvqa")


@case("predict --format coco for a text task", "use --format florence-jsonl")
def _(env: Env) -> list[str]:
    return [*_many(env, str(_images(env)), out=env.tmp / "labels"), "--format", "coco"]


@case("predict --dataset without its image column", "has no column 'picture'")
def _(env: Env) -> list[str]:
    return [*_many(env, out=env.tmp / "o.jsonl"), "--dataset", str(env.docvqa), "--image-column", "picture"]


@case("predict: another task over an existing --output", "pass --overwrite")
def _(env: Env) -> list[str]:
    out = env.tmp / "o.jsonl"
    out.write_text(json.dumps({"key": "x", "model": str(env.tiny), "task": "ocr", "prompt": "<OCR>"}) + "\n")
    return _many(env, str(_images(env)), out=out)


@case("predict: a folder of unreadable images", "0 answered, 0 skipped as already done, 2 unreadable", code=0)
def _(env: Env) -> list[str]:
    folder = env.tmp / "imgs"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    png_header_only(folder / "bomb.png", 20000, 20000)
    return _many(env, str(folder))


@case("--eval-every: a task's answer length past the decoder's positions is capped", "answers are capped at 48",
      code=0)
def _(env: Env) -> list[str]:
    env.check = saved
    return env.ft("--eval-every", "1", data=short_question_data(env), model=short_table_model(env), batch=1)


# --- options and --config -----------------------------------------------------------------------


@case("misspelt option", "No such option", usage=True)
def _(env: Env) -> list[str]:
    return env.ft("--batch-sise", "4")


@case("invalid --mode", "Invalid value", usage=True)
def _(env: Env) -> list[str]:
    return env.ft("--mode", "lora-ish")


@case("--batch-size 0", "--batch-size must be at least 1")
def _(env: Env) -> list[str]:
    return env.ft("--batch-size", "0")


@case("--grad-accum 0", "--grad-accum must be at least 1")
def _(env: Env) -> list[str]:
    return env.ft("--grad-accum", "0")


@case("--max-steps 0", "--max-steps must be at least 1")
def _(env: Env) -> list[str]:
    return env.ft("--max-steps", "0")


@case("fp16 on a machine without a CUDA GPU", "--precision fp16 needs a CUDA GPU")
def _(env: Env) -> list[str]:
    return env.ft("--precision", "fp16")


@case("vision-feature cache with a tower that trains", "--cache-vision-features needs a frozen vision tower")
def _(env: Env) -> list[str]:
    return [*env.ft("--cache-vision-features"), "--mode", "full"]


@case("--resume latest with no checkpoint", "no checkpoint in")
def _(env: Env) -> list[str]:
    return env.ft("--resume", "latest")


@case("--lora-vision without a LoRA mode", "--lora-vision needs --mode lora or qlora")
def _(env: Env) -> list[str]:
    return env.ft("--lora-vision")


@case("negative --lr", "--lr cannot be negative")
def _(env: Env) -> list[str]:
    return env.ft("--lr=-0.001")


@case("no task and no --config", "no task")
def _(env: Env) -> list[str]:
    return ["finetune", "--model", str(env.tiny), "--output-dir", str(env.out)]


@case("--config with a misspelt key", "unknown option 'lerning_rate'")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("task: docvqa\nlerning_rate: 0.1\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("--config key close to an option", "did you mean 'batch_size'")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("task: docvqa\nbatch_sise: 4\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("--config with bad YAML", "is not valid YAML")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("task: [docvqa\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("--config that is not a mapping", "must be a mapping")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("- task\n- docvqa\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("--config file missing", "does not exist")
def _(env: Env) -> list[str]:
    return env.ft("--config", str(env.tmp / "nope.yaml"))


@case("--config with an invalid value", "option 'schedule' = 'cosinus'")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("schedule: cosinus\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("--config with a list where one value is expected", "takes one value")
def _(env: Env) -> list[str]:
    (env.tmp / "run.yaml").write_text("lr: [0.1, 0.2]\n")
    return env.ft("--config", str(env.tmp / "run.yaml"))


@case("caption task with --eval-every, Java tokenizer chosen, no Java", "the Java caption tokenizer needs")
def _(env: Env) -> list[str]:
    import shutil

    which = shutil.which
    env.monkeypatch.setenv("FLORENCE_KIT_CAPTION_TOKENIZER", "java")
    env.monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "java" else which(name, *a, **k))
    env.check = nothing_written  # refused before the first step, not at the first evaluation
    rows = [{"captions": ["a white page", "an empty page"]}] * 4
    return env.ft("--eval-every", "1", task="caption", data=env.rows_data(rows))


@case("--report-to tensorboard without the package", "pip install 'florence-kit[tensorboard]'")
def _(env: Env) -> list[str]:
    import importlib.util

    env.monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    env.check = nothing_written
    return env.ft("--report-to", "tensorboard")


@case("--report-to unknown tracker", "Invalid value", usage=True)
def _(env: Env) -> list[str]:
    return env.ft("--report-to", "mlflow")


@case("--push-to-hub while offline", "cannot push to the hub while offline")
def _(env: Env) -> list[str]:
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.check = nothing_written
    return env.ft("--push-to-hub", "me/florence2-docvqa")


@case("--push-to-hub with an invalid repo id", "is not a valid hub repo id")
def _(env: Env) -> list[str]:
    env.check = nothing_written
    return env.ft("--push-to-hub", "not a repo//id")


@case("push of a folder that is not a run", "not a finished run folder")
def _(env: Env) -> list[str]:
    (env.tmp / "notrun").mkdir()
    return ["push", str(env.tmp / "notrun"), "me/x"]


# --- the runner ---------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in root.rglob("*") if p.is_file()}


def record(request: pytest.FixtureRequest, kind: str, outcome: str) -> None:
    tally = request.config.__dict__.setdefault("bad_input_catalogue", {})
    tally[kind] = outcome


@pytest.mark.parametrize("c", CASES, ids=[c.kind for c in CASES])
def test_bad_input(c: Case, request: pytest.FixtureRequest, tmp_path: Path, tiny_dir: Path, docvqa_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path, tiny_dir, docvqa_dir, monkeypatch)
    args = c.build(env)
    before = snapshot(tmp_path, tiny_dir, docvqa_dir)
    result = runner.invoke(app, args)
    output = result.output
    assert result.exit_code == c.code, f"exit {result.exit_code}\n{output}\n{result.exception!r}"
    assert "Traceback" not in output
    if c.code == 0 or c.usage:
        assert c.expect in output, output
    else:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert c.expect in errors[0], output
    after = snapshot(tmp_path, tiny_dir, docvqa_dir)
    changed = [str(p) for p, digest in before.items() if after.get(p) != digest and p not in env.may_change]
    assert not changed, f"files written before the run were changed: {changed}"
    if env.check:
        env.check(env, output)
    record(request, c.kind, "handled" if c.code == 0 else f"exit {c.code}")


def test_ctrl_c_saves_and_exits_cleanly(request: pytest.FixtureRequest, tmp_path: Path, tiny_dir: Path,
                                        docvqa_dir: Path) -> None:
    """SIGINT mid-training: the step in flight finishes, the model at that step is saved, exit code 130."""
    out = tmp_path / "out"
    args = ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
            "--max-steps", "100000", "--batch-size", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", "from florence_kit.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.read_text().strip()):  # step 1 is always logged
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted (Ctrl-C) at step" in errors[0], stderr
    import yaml

    run = yaml.safe_load((out / "config.yaml").read_text())["run"]
    assert run["interrupted_at_step"] >= 1 and run["steps"] == run["interrupted_at_step"]
    assert (out / "model.safetensors").is_file() and "interrupted (Ctrl-C)" in (out / "README.md").read_text()
    from florence_kit.model.loading import load_model

    load_model(str(out))  # what was saved is a whole, loadable model
    record(request, "Ctrl-C during training", "exit 130, model saved")


def test_catalogue_has_at_least_40_kinds() -> None:
    assert len(CASES) + 1 >= 40
