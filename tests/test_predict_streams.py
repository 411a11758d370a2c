"""``predict`` over a stream split between processes (each reads only its shards, the merged file is the one-process
file), and region-in tasks over many inputs (a box per input; a bad box lands in the sidecar, the run goes on)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app

runner = CliRunner()
SHORT = ["--max-new-tokens", "6", "--quiet"]
SHARD_ROWS = (2, 3, 1, 3)  # rows in each parquet file (shard) of the stream; row 4 is broken


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def png(seed: int, height: int = 24, width: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def parquet_shards(root: Path) -> list[str]:
    """Four parquet files of 2, 3, 1 and 3 images (an ``id`` each, ``s<shard>-<i>``; one image broken)."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")})
    files, row = [], 0
    for shard, n in enumerate(SHARD_ROWS):
        images = []
        for _ in range(n):
            images.append({"bytes": b"not an image" if row == 4 else png(row), "path": None})
            row += 1
        path = root / f"part-{shard}.parquet"
        datasets.Dataset.from_dict({"image": images, "id": [f"s{shard}-{i}" for i in range(n)]},
                                   features=features).to_parquet(str(path))
        files.append(str(path))
    return files


def stream_of(files: list[str]):
    import datasets

    return datasets.load_dataset("parquet", data_files={"train": files}, streaming=True)["train"]


@pytest.mark.parametrize("files_count", [4, 1])
def test_each_process_reads_the_rows_split_dataset_by_node_gives_it(tmp_path, monkeypatch, files_count):
    """With as many shards as processes or more, a process reads only its shards (those split_dataset_by_node
    assigns it); with fewer, it reads all and keeps its rows. The keys put together give the one-process order."""
    from datasets.distributed import split_dataset_by_node

    import florence_kit.evaluate.corpus as corpus

    files = parquet_shards(tmp_path / "data")
    if files_count == 1:
        import datasets

        one = tmp_path / "one.parquet"
        datasets.concatenate_datasets([datasets.Dataset.from_parquet(f) for f in files]).to_parquet(str(one))
        files = [str(one)]
    ds = stream_of(files)
    single = corpus.Stream(ds, "image", None)
    monkeypatch.setattr(corpus, "dist_info", lambda: (0, 1))
    whole = [item.image.key for items, _ in single for item in items]
    assert single.rows_read == sum(SHARD_ROWS)

    got, read, shares = [], [], []
    for rank in (0, 1):
        monkeypatch.setattr(corpus, "dist_info", lambda rank=rank: (rank, 2))
        stream = corpus.Stream(ds, "image", None)
        ids = [item.info.get("id") for items, _ in stream for item in items]
        assert ids == [row["id"] for row in split_dataset_by_node(ds.select_columns(["id"]), rank, 2)]
        got.append(ids)
        read.append(stream.rows_read)
        shares.append(stream.rows_per_shard)
    assert sorted(got[0] + got[1]) == sorted(row["id"] for row in ds.select_columns(["id"]))
    if files_count == 4:  # shards 0, 2 and 1, 3: each process reads its own rows only
        assert read == [SHARD_ROWS[0] + SHARD_ROWS[2], SHARD_ROWS[1] + SHARD_ROWS[3]]
        assert whole[:3] == ["0:0", "0:1", "1:0"]
    else:  # one shard: both read every row, each keeps one in two
        assert read == [sum(SHARD_ROWS)] * 2 and whole[:3] == ["0", "1", "2"]
    assert single.order(shares) == whole


LAUNCH = '''
import atexit, os, sys
import datasets
import florence_kit.data.dataset as dataset_module

files, counts = sys.argv[1].split(","), sys.argv[2]
read = [0]

def count(row):
    read[0] += 1
    return row

def load_source(source, name=None, streaming=False):
    stream = datasets.load_dataset("parquet", data_files={"train": files}, streaming=True)["train"]
    stream = stream.cast_column("image", datasets.Image(decode=False))  # counted, not decoded, on the way
    return datasets.IterableDatasetDict({"train": stream.map(count)})

dataset_module.load_source = load_source
atexit.register(lambda: open(os.path.join(counts, f"read-{os.environ.get('RANK', '0')}.txt"), "w").write(str(read[0])))
from florence_kit.cli import app
app(sys.argv[3:])
'''


@pytest.mark.slow
def test_two_processes_over_a_stream_read_their_shards_and_write_the_one_process_file(tiny_dir, tmp_path):
    files = parquet_shards(tmp_path / "data")
    launch = tmp_path / "launch.py"
    launch.write_text(LAUNCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}

    def args(name: str) -> list[str]:
        (tmp_path / name).mkdir()
        return [str(launch), ",".join(files), str(tmp_path / name), "predict", "--dataset", "hub/stream", "--streaming",
                "--task", "caption", "--model", str(tiny_dir), "--output", str(tmp_path / f"{name}.jsonl"),
                "--batch-size", "2", *SHORT]

    one = subprocess.run([sys.executable, *args("one")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args("two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "8 answered, 0 skipped as already done, 1 unreadable" in two.stdout, two.stdout
    reference = (tmp_path / "one.jsonl").read_bytes()
    records = lines(tmp_path / "one.jsonl")
    assert [r["id"] for r in records] == ["s0-0", "s0-1", "s1-0", "s1-1", "s2-0", "s3-0", "s3-1", "s3-2"]
    assert [r["row"] for r in records] == [0, 1, 2, 3, 5, 6, 7, 8]  # row 4 is the broken image
    assert (tmp_path / "two.jsonl").read_bytes() == reference
    assert (tmp_path / "two.bad.jsonl").read_bytes() == (tmp_path / "one.bad.jsonl").read_bytes()
    assert lines(tmp_path / "two.bad.jsonl")[0]["row"] == 4
    read = {p.name: int(p.read_text()) for p in (tmp_path / "two").iterdir()}
    assert read == {"read-0.txt": SHARD_ROWS[0] + SHARD_ROWS[2], "read-1.txt": SHARD_ROWS[1] + SHARD_ROWS[3]}
    assert int((tmp_path / "one" / "read-0.txt").read_text()) == sum(SHARD_ROWS)


# ---------------------------------------------------------------------------------------------
# Region-in tasks over many inputs


def test_one_box_for_every_image_and_a_box_outside_one_goes_to_the_sidecar(tiny_dir, tmp_path, one_thread):
    from florence_kit.evaluate.region_answers import render_prompt
    from florence_kit.tasks.registry import get_task

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, height in enumerate((40, 20, 48)):  # the box starts at y=30: outside the 20-pixel-high image
        (folder / f"im{i}.png").write_bytes(png(i, height=height))
    out = tmp_path / "regions.jsonl"
    result = runner.invoke(app, ["predict", str(folder), "--task", "region-category", "--model", str(tiny_dir),
                                 "--box", "4,30,20,36", "--output", str(out), "--batch-size", "2", *SHORT])
    assert result.exit_code == 0, result.output
    assert "2 answered, 0 skipped as already done, 1 unreadable" in result.output
    spec = get_task("region-category")
    records = lines(out)
    assert [Path(r["path"]).name for r in records] == ["im0.png", "im2.png"]
    for rec in records:  # the prompt the one-image command writes for this box and this image's size
        assert rec["prompt"] == render_prompt(spec, None, "4,30,20,36", (rec["width"], rec["height"]))
        assert rec["box"] == "4,30,20,36" and "<loc_" in rec["prompt"]
    assert records[0]["prompt"] != records[1]["prompt"]  # the same pixels are other bins in a taller image
    bad = lines(tmp_path / "regions.bad.jsonl")
    assert [Path(r["path"]).name for r in bad] == ["im1.png"] and "outside the 32x20 image" in bad[0]["error"]

    again = runner.invoke(app, ["predict", str(folder), "--task", "region-category", "--model", str(tiny_dir),
                                "--box", "4,30,20,36", "--output", str(out), *SHORT])
    assert again.exit_code == 0 and "0 answered, 3 skipped" in again.output, again.output


def test_a_box_per_input_from_a_list_and_from_a_dataset_column(tiny_dir, tmp_path, one_thread):
    import datasets

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(1, 40, 40))
    listing = tmp_path / "list.jsonl"
    rows = [{"image": "imgs/a.png", "box": [0, 0, 20, 20]}, {"image": "imgs/a.png", "box": "10,10,30,30"},
            {"image": "imgs/a.png", "box": "1,2,3"}, {"image": "imgs/a.png"}, {"image": "imgs/a.png", "box": "5,5,5,9"}]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ocr.jsonl"
    result = runner.invoke(app, ["predict", f"@{listing}", "--task", "region-ocr", "--model", str(tiny_dir),
                                 "--output", str(out), *SHORT])
    assert result.exit_code == 0, result.output
    assert "2 answered, 0 skipped as already done, 3 unreadable" in result.output
    assert [r["box"] for r in lines(out)] == ["0,0,20,20", "10,10,30,30"]
    bad = {r["key"].split("#")[-1]: r["error"] for r in lines(tmp_path / "ocr.bad.jsonl")}
    assert "four numbers" in bad["box=1,2,3"] and "no area" in bad["box=5,5,5,9"]
    assert "no box given" in bad[str(listing.parent / "imgs" / "a.png")]

    # a dataset column; --box for the rows without one
    data = tmp_path / "data"
    features = datasets.Features({"image": datasets.Image(), "region": datasets.Sequence(datasets.Value("float32"))})
    datasets.Dataset.from_dict({"image": [{"bytes": png(i, 40, 40), "path": None} for i in range(3)],
                                "region": [[0, 0, 10, 10], None, [50, 50, 60, 60]]},
                               features=features).save_to_disk(str(data))
    out = tmp_path / "cats.jsonl"
    result = runner.invoke(app, ["predict", "--dataset", str(data), "--task", "region-category", "--model",
                                 str(tiny_dir), "--box-column", "region", "--box", "0,0,40,40", "--output", str(out),
                                 *SHORT])
    assert result.exit_code == 0, result.output
    assert [(r["row"], r["box"]) for r in lines(out)] == [(0, "0.0,0.0,10.0,10.0"), (1, "0,0,40,40")]
    assert "outside the 40x40 image" in lines(tmp_path / "cats.bad.jsonl")[0]["error"]


def test_box_options_are_checked_before_the_model_loads(tmp_path):
    (tmp_path / "a.png").write_bytes(png(0))
    args = ["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "no-model"), "--output",
            str(tmp_path / "o.jsonl")]
    missing = runner.invoke(app, [*args, "--task", "region-category"])
    assert missing.exit_code == 2 and "asks about a box" in missing.output
    needless = runner.invoke(app, [*args, "--task", "caption", "--box", "0,0,4,4"])
    assert needless.exit_code == 2 and "asks about no region" in needless.output
