"""Task breadth: The Cauldron (every subset), captioning, OCR and VQA train and score offline on data in
their exact public schemas; mixes, streaming, local formats, task folders with code, and plugins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import tomllib
import yaml
from synthetic_tasks import caption_rows, cauldron_rows, ocr_rows, shape_image, splits, vqa_rows
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.data.dataset import TaskDataset, cap_rows, load_split
from florence_kit.data.mixing import MixedDataset, parse_weights, training_data
from florence_kit.metrics import get_metric
from florence_kit.tasks.registry import all_tasks, get_task, resolve_tasks

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "examples" / "florence-kit-plugin-example"

# The configurations of HuggingFaceM4/the_cauldron (its dataset card).
CAULDRON_SUBSETS = [
    "ai2d", "aokvqa", "chart2text", "chartqa", "clevr", "clevr_math", "cocoqa", "datikz", "diagram_image_to_text",
    "docvqa", "dvqa", "figureqa", "finqa", "geomverse", "hateful_memes", "hitab", "iam", "iconqa", "infographic_vqa",
    "intergps", "localized_narratives", "mapqa", "mimic_cgd", "multihiertt", "nlvr2", "ocrvqa", "okvqa", "plotqa",
    "raven", "rendered_text", "robut_sqa", "robut_wikisql", "robut_wtq", "scienceqa", "screen2words",
    "spot_the_diff", "st_vqa", "tabmwp", "tallyqa", "tat_qa", "textcaps", "textvqa", "tqa", "vistext", "visual7w",
    "visualmrc", "vqarad", "vqav2", "vsr", "websight",
]
CHARTQA_TURNS = sum(len(t) for t in cauldron_rows(4, seed=1)["texts"])  # the local chartqa copy
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def cauldron_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local copy laid out like the hub repository: one folder per configuration."""
    root = tmp_path_factory.mktemp("the_cauldron")
    datasets.DatasetDict({"train": cauldron_rows(8, seed=0)}).save_to_disk(str(root / "ai2d"))
    datasets.DatasetDict({"train": cauldron_rows(4, seed=1)}).save_to_disk(str(root / "chartqa"))
    return root


def _save(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    out = tmp_path_factory.mktemp(name) / "data"
    splits(make).save_to_disk(str(out))
    return out


def _finetune(task: str, model: Path, data: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["finetune", task, "--model", str(model), "--dataset", str(data),
                                 "--output-dir", str(out), *TRAIN, *extra])
    assert result.exit_code == 0, result.output
    return result


def _eval(task: str, model: Path, data: Path, out: Path, *extra: str) -> tuple[dict, list[dict]]:
    result = runner.invoke(app, ["eval", task, "--model", str(model), "--dataset", str(data),
                                 "--output-dir", str(out), "--quiet", "--max-new-tokens", "8", *extra])
    assert result.exit_code == 0, result.output
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), preds


# ---------------------------------------------------------------------------------------------
# The list


def test_tasks_list_shows_every_family_and_every_cauldron_subset() -> None:
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 0, result.output
    names = {line.split("\t")[0] for line in result.stdout.splitlines()}  # piped: one tab-separated line each
    for name in ("docvqa", "caption", "detailed_caption", "more_detailed_caption", "ocr", "vqa"):
        assert name in names, name
    for subset in CAULDRON_SUBSETS:
        assert f"cauldron/{subset}" in names, subset
    assert "group cauldron: 50 tasks" in result.stdout
    tasks = all_tasks()
    assert sorted(n for n in tasks if n.startswith("cauldron/")) == sorted(f"cauldron/{s}" for s in CAULDRON_SUBSETS)
    assert {tasks[f"cauldron/{s}"].dataset.name for s in CAULDRON_SUBSETS} == set(CAULDRON_SUBSETS)
    assert len({tasks[f"cauldron/{s}"].origin for s in CAULDRON_SUBSETS}) == 1  # one file
    assert tasks["cauldron/chartqa"].metric == "relaxed_accuracy" and tasks["cauldron/docvqa"].metric == "anls"
    assert tasks["caption"].metrics == ("cider", "bleu4") and tasks["ocr"].metrics == ("cer", "wer")


def test_groups_and_comma_lists_resolve() -> None:
    assert [t.name for t in resolve_tasks("cauldron/ai2d, cauldron/chartqa")] == ["cauldron/ai2d", "cauldron/chartqa"]
    assert len(resolve_tasks("cauldron")) == 50
    with pytest.raises(UserError, match="did you mean cauldron"):
        resolve_tasks("cauldrn")


# ---------------------------------------------------------------------------------------------
# The Cauldron


def test_cauldron_turns_become_examples_and_images_tile() -> None:
    rows = cauldron_rows(8, seed=0)
    task = get_task("cauldron/ai2d")
    ds = TaskDataset(rows, task, with_target=True)
    assert len(ds) == sum(len(t) for t in rows["texts"])  # one example per turn
    turns = rows[0]["texts"]
    assert len(turns) == 3
    for k in range(3):  # row 0's three turns, each on the same image, no earlier turn in the prompt
        ex = ds[k]
        assert (ex.id, ex.prompt, ex.target, ex.references) == (
            f"0-{k}", turns[k]["user"], turns[k]["assistant"], [turns[k]["assistant"]])
    two = ds[3]  # row 1 has two images: tiled side by side into one
    left, right = (np.asarray(im.convert("RGB")) for im in rows[1]["images"])
    assert two.id == "1-0" and two.image.size == (128, 64)
    assert np.array_equal(np.asarray(two.image)[:, :64], left) and np.array_equal(np.asarray(two.image)[:, 64:], right)
    assert [p for _, p, _ in ds.texts()] == [ds[i].prompt for i in range(len(ds))]
    first = TaskDataset(rows, get_task("cauldron/ai2d").__class__(**{**task.__dict__, "multi_image": "first"}),
                        with_target=True)
    assert first[3].image.size == (64, 64)


def test_cauldron_subset_trains_and_evaluates(tiny_dir: Path, cauldron_dir: Path, tmp_path: Path) -> None:
    result = _finetune("cauldron/ai2d", tiny_dir, cauldron_dir, tmp_path / "ft")
    assert "of 13 examples" in result.output  # 8 rows, 13 turns
    metrics, preds = _eval("cauldron/ai2d", tmp_path / "ft", cauldron_dir, tmp_path / "ev")
    assert metrics["metric"] == "exact_match" and metrics["n"] == metrics["n_scored"] == 13 == len(preds)
    assert preds[0]["id"] == "0-0" and preds[2]["prompt"].startswith("Is the shape a square?")
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_cauldron_mix_trains_with_weights(tiny_dir: Path, cauldron_dir: Path, tmp_path: Path) -> None:
    _finetune("cauldron/ai2d,cauldron/chartqa", tiny_dir, cauldron_dir, tmp_path / "mix",
              "--mix-weights", "cauldron/ai2d=1,cauldron/chartqa=3", "--prepare-data", "--group-by-length")
    config = yaml.safe_load((tmp_path / "mix" / "config.yaml").read_text())
    assert config["mix_weights"] == "cauldron/ai2d=1,cauldron/chartqa=3"
    mix = config["run"]["mix"]  # run facts live under run: (the options stay top-level for --config)
    assert mix["cauldron/ai2d"]["examples"] == 13 and mix["cauldron/chartqa"]["examples"] == CHARTQA_TURNS
    assert mix["cauldron/ai2d"]["drawn"] + mix["cauldron/chartqa"]["drawn"] == 13 + CHARTQA_TURNS  # one epoch
    assert mix["cauldron/chartqa"]["drawn"] > mix["cauldron/ai2d"]["drawn"]  # weight 3 vs 1


def test_mix_sampling_follows_the_weights(cauldron_dir: Path) -> None:
    tasks = resolve_tasks("cauldron/ai2d,cauldron/chartqa")
    data = training_data(tasks, str(cauldron_dir), seed=0)  # default: proportional to size
    total = 13 + CHARTQA_TURNS
    assert len(data.dataset) == total and data.name == "cauldron/ai2d,cauldron/chartqa"
    parts = data.dataset.parts
    only_second = MixedDataset(parts, [0, 1], seed=0)
    assert only_second.counts == [0, total]
    epoch = [only_second.index[p] for p in only_second.draws(range(total))(0)]
    assert {t for t, _ in epoch} == {1} and len(epoch) == total
    assert sorted({i for _, i in epoch[:CHARTQA_TURNS]}) == list(range(CHARTQA_TURNS))  # all seen, then repeats
    assert [p for _, p, _ in only_second.texts()] == [only_second[i].prompt for i in range(len(only_second))]
    assert parse_weights("2,1", ["a", "b"]) == [2.0, 1.0] and parse_weights(None, ["a"]) is None
    for bad in ("2", "a=x", "c=1", "0,0"):
        with pytest.raises(UserError, match="--mix-weights"):
            parse_weights(bad, ["a", "b"])


def test_mix_shares_follow_the_weights_exactly_and_by_size_use_every_example_once() -> None:
    class Part:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    for seed in range(5):  # random draws left a few examples of some task out of every epoch
        by_size = MixedDataset([Part(1000), Part(100)], [1000, 100], seed=seed)
        assert sorted(by_size.index) == [(0, i) for i in range(1000)] + [(1, i) for i in range(100)]
        weighted = MixedDataset([Part(1000), Part(100)], [1, 3], seed=seed)
        assert weighted.counts == [275, 825]  # 1:3 of 1100 positions, not 1:3 on average
    assert [p for p, _ in by_size.index[:20]].count(1) < 20  # still interleaved
    assert by_size.draws(range(1100)) is None  # by size: each epoch a plain shuffle of every example


def test_weighted_mix_continues_through_a_down_weighted_task_epoch_after_epoch() -> None:
    """A task drawn 200 times an epoch out of 1000 examples sees the next 200 each epoch, all 1000 in 5 epochs.

    The mix's index was once fixed for the run, so such a task trained on the same 200 examples every epoch."""
    from florence_kit.data.prepared import LengthGroups, PageGroups
    from florence_kit.train.sampling import EpochShuffle

    class Part:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    mixed = MixedDataset([Part(1000), Part(100)], [1, 4], seed=3)
    keep = [p for p in range(len(mixed)) if p % 7]  # the length preflight dropped every 7th position
    sampler = EpochShuffle(len(keep), seed=3, draws=mixed.draws(keep))
    epochs = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert len(order) == len(keep)
        epochs.append([mixed.index[keep[p]] for p in order])
    big = [{i for t, i in e if t == 0} for e in epochs]
    small = [[i for t, i in e if t == 1] for e in epochs]
    kept_big = {mixed.index[p][1] for p in keep if mixed.index[p][0] == 0}
    kept_small = {mixed.index[p][1] for p in keep if mixed.index[p][0] == 1}
    share = sum(1 for t, _ in epochs[0] if t == 0)
    assert share == round(len(keep) / 5) and all(len(b) == share for b in big)  # no repeats within an epoch
    assert not big[0] & big[1] and not big[1] & big[2]  # epoch 2 draws the next examples
    whole = -(-len(kept_big) // share)  # epochs to go through the task once
    assert set().union(*big[:whole]) == kept_big  # every kept example before any repeats
    assert sum(len(b) for b in big[: whole - 1]) == len(set().union(*big[: whole - 1]))
    for drawn in small:  # the up-weighted task: every kept example 8 or 9 times an epoch, the copies moving on
        counts = [drawn.count(i) for i in kept_small]
        assert set(counts) <= {len(drawn) // len(kept_small), len(drawn) // len(kept_small) + 1}
    assert small[0] != small[1] and sorted(small[0]) != sorted(small[1])
    sampler.set_epoch(2)
    again = [mixed.index[keep[p]] for p in sampler]
    assert again == epochs[2]  # a function of the epoch alone: --resume and every DDP process rebuild it
    draws = mixed.draws(keep)
    for grouped in (PageGroups([p // 3 for p in range(len(keep))], seed=3, draws=draws),
                    LengthGroups([p % 11 for p in range(len(keep))], batch_size=4, seed=3, draws=draws)):
        grouped.set_epoch(4)  # --group-by-image / --group-by-length order the same epoch's draws
        assert sorted(grouped) == sorted(draws(4))


def test_tasks_show_renders_a_cauldron_turn(cauldron_dir: Path) -> None:
    result = runner.invoke(app, ["tasks", "show", "cauldron/ai2d", "--dataset", str(cauldron_dir)],
                           terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "subsets:" in result.stdout  # the file itself
    assert "explode=texts multi_image=tile group=cauldron" in result.stdout
    assert "example prompt: 'What colour is the shape?'" in result.stdout
    assert "HuggingFaceM4/the_cauldron" in result.stdout and "name='ai2d'" in result.stdout


# ---------------------------------------------------------------------------------------------
# Captioning, OCR, VQA


def test_caption_trains_and_scores_cider_and_bleu4(tiny_dir: Path, tmp_path_factory, tmp_path: Path) -> None:
    data = _save(tmp_path_factory, "captions", caption_rows)
    _finetune("caption", tiny_dir, data, tmp_path / "ft")
    metrics, preds = _eval("caption", tmp_path / "ft", data, tmp_path / "ev")
    assert metrics["metric"] == "cider" and metrics["n_scored"] == 4 and len(preds[0]["references"]) == 5
    assert preds[0]["prompt"] == "<CAPTION>"
    refs = [p["references"] for p in preds]
    answers = [p["prediction"] for p in preds]
    assert metrics["cider"] == pytest.approx(get_metric("cider").compute(answers, refs)[1])
    assert metrics["bleu4"] == pytest.approx(get_metric("bleu4").compute(answers, refs)[1])


def test_caption_reads_a_single_caption_string_column() -> None:
    rows = datasets.Dataset.from_dict({"image": [shape_image("red", "square")], "caption": ["a red square"]})
    ex = TaskDataset(rows, get_task("detailed_caption"), with_target=True)[0]
    assert (ex.prompt, ex.target, ex.references) == ("<DETAILED_CAPTION>", "a red square", ["a red square"])


def test_caption_gathers_numbered_caption_columns() -> None:
    rows = datasets.Dataset.from_dict({"image": [shape_image("red", "square")], "caption_0": ["a red square"],
                                       "caption_1": ["red box"], "caption_2": ["a square"]})
    ex = TaskDataset(rows, get_task("caption"), with_target=True)[0]  # Flickr8k's layout
    assert (ex.target, ex.references) == ("a red square", ["a red square", "red box", "a square"])


def test_ocr_trains_and_scores_cer_and_wer(tiny_dir: Path, tmp_path_factory, tmp_path: Path) -> None:
    data = _save(tmp_path_factory, "ocr", ocr_rows)
    _finetune("ocr", tiny_dir, data, tmp_path / "ft")
    metrics, preds = _eval("ocr", tmp_path / "ft", data, tmp_path / "ev")
    assert metrics["metric"] == "cer" and metrics["higher_is_better"] is False
    assert {"cer", "wer"} <= set(metrics) and metrics["n_scored"] == 4
    answers, refs = [p["prediction"] for p in preds], [p["references"] for p in preds]
    assert metrics["cer"] == pytest.approx(get_metric("cer").compute(answers, refs)[1])
    assert [p["score"] for p in preds] == pytest.approx(get_metric("cer").compute(answers, refs)[0])


def test_vqa_reads_the_vqav2_schema_and_scores_vqa_accuracy(tiny_dir: Path, tmp_path_factory, tmp_path) -> None:
    rows = vqa_rows(4)
    ex = TaskDataset(rows, get_task("vqa"), with_target=True)[0]
    assert ex.target == rows[0]["multiple_choice_answer"] and len(ex.references) == 10
    assert ex.id == str(rows[0]["question_id"]) and ex.prompt == rows[0]["question"]
    # the same answers stored as datasets.Sequence(dict), i.e. a dict of lists, read the same
    as_columns = {k: [a[k] for a in rows[0]["answers"]] for k in rows[0]["answers"][0]}
    from florence_kit.data.dataset import lookup

    assert lookup({"answers": as_columns}, "answers.answer") == ex.references
    data = _save(tmp_path_factory, "vqa", vqa_rows)
    metrics, preds = _eval("vqa", tiny_dir, data, tmp_path / "ev")
    assert metrics["metric"] == "vqa_accuracy" and "exact_match" in metrics and metrics["n_scored"] == 4
    assert [p["score"] for p in preds] == [get_metric("vqa_accuracy").score(p["prediction"], p["references"])
                                          for p in preds]


# ---------------------------------------------------------------------------------------------
# Streaming and local formats


def test_streaming_reads_only_max_samples_rows(tiny_dir: Path, cauldron_dir: Path, tmp_path: Path) -> None:
    task = get_task("cauldron/ai2d")
    streamed = load_split(task, str(cauldron_dir), "train", streaming=True)
    assert isinstance(streamed, datasets.IterableDataset)
    capped = cap_rows(streamed, 2)
    assert len(capped) == 2 and capped.features == cauldron_rows(1).features
    with pytest.raises(UserError, match="--streaming needs --max-samples"):
        cap_rows(streamed, None)
    result = _finetune("cauldron/ai2d", tiny_dir, cauldron_dir, tmp_path / "s", "--streaming", "--max-samples", "2")
    assert "of 4 examples" in result.output  # only rows 0 and 1 were read: 3 + 1 turns
    refused = runner.invoke(app, ["finetune", "cauldron/ai2d", "--model", str(tiny_dir), "--dataset",
                                  str(cauldron_dir), "--output-dir", str(tmp_path / "t"), "--streaming"])
    assert refused.exit_code == 2 and "--streaming needs --max-samples" in refused.output


def test_split_row_ranges_hold_out_rows_of_a_single_split(cauldron_dir: Path) -> None:
    task = get_task("cauldron/ai2d")
    for streaming in (False, True):
        head = cap_rows(load_split(task, str(cauldron_dir), "train[:5]", streaming=streaming), 100)
        tail = cap_rows(load_split(task, str(cauldron_dir), "train[5:]", streaming=streaming), 100)
        assert (len(head), len(tail)) == (5, 3)
        assert tail[0]["texts"] == cauldron_rows(8, seed=0)[5]["texts"]
    for bad in ("train[-5:]", "train[3:1]", "train[a:b]"):
        with pytest.raises(UserError, match="split"):
            load_split(task, str(cauldron_dir), bad)


def test_streaming_from_an_unreachable_hub_is_one_clear_line(tiny_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "cauldron/ai2d", "--model", str(tiny_dir), "--streaming",
                                 "--max-samples", "5", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "HuggingFaceM4/the_cauldron" in result.output and "offline" in result.output
    assert "Traceback" not in result.output


def test_imagefolder_with_metadata_jsonl_and_jsonl_paths_load(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "train").mkdir(parents=True)
    rows = caption_rows(3)
    with (folder / "train" / "metadata.jsonl").open("w") as fh:
        for i, row in enumerate(rows):
            row["image"].save(folder / "train" / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "captions": row["captions"]}) + "\n")
    task = get_task("caption")
    ds = TaskDataset(load_split(task, str(folder), "train"), task, with_target=True)
    assert len(ds) == 3 and ds[0].references == rows[0]["captions"]
    assert np.array_equal(np.asarray(ds[0].image), np.asarray(rows[0]["image"].convert("RGB")))
    jsonl = tmp_path / "ocr.jsonl"
    ocr = ocr_rows(2)
    ocr[0]["image"].save(tmp_path / "line.png")
    jsonl.write_text(json.dumps({"image": "line.png", "text": ocr[0]["text"]}) + "\n")
    ex = TaskDataset(load_split(get_task("ocr"), str(jsonl), "train"), get_task("ocr"), with_target=True)[0]
    assert ex.target == ocr[0]["text"] and ex.image.size == ocr[0]["image"].size


# ---------------------------------------------------------------------------------------------
# Task folders with code, broken files, plugins

FOLDER_TASK = """
task: shapes_upper
dataset: {path: ./shapes}
prompt: "What colour is the shape?"
target: "{answer}"
references: answer
metric: exact_match
row_map: shapes_utils:to_answer
"""


def test_task_folder_task_with_a_row_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ROOT / "examples" / "task-folder"  # the shipped example: colour_sentence.yaml + colour_utils.py
    result = runner.invoke(app, ["tasks", "list", "--tasks-dir", str(folder)])
    assert result.exit_code == 0 and "colour_sentence" in result.stdout
    rows = datasets.Dataset.from_dict({"image": [shape_image("red", "circle")], "colour": ["Red"]})
    ex = TaskDataset(rows, get_task("colour_sentence", [folder]), with_target=True)[0]
    assert (ex.prompt, ex.target, ex.references) == ("<CAPTION>", "The shape is red.", ["The shape is red."])
    monkeypatch.setenv("FLORENCE_KIT_TASKS_PATH", str(folder))  # the environment variable finds it too
    assert get_task("colour_sentence").origin == str(folder / "colour_sentence.yaml")
    (tmp_path / "shapes.yaml").write_text(FOLDER_TASK)  # a function that fails names the row and the function
    (tmp_path / "shapes_utils.py").write_text("def to_answer(row):\n    return row['missing']\n")
    with pytest.raises(UserError, match="row 0: row_map 'shapes_utils:to_answer' failed"):
        TaskDataset(rows, get_task("shapes_upper", [tmp_path]), with_target=True)[0]


def test_row_map_in_a_base_file_in_another_folder_is_found_beside_the_base(tmp_path: Path) -> None:
    """A base file in a shared folder declaring ``row_map``: its module used to be looked up beside the including
    file (an error, or another folder's module of that name), not beside the base file that names it."""
    shared, tasks = tmp_path / "shared", tmp_path / "tasks"
    shared.mkdir()
    tasks.mkdir()
    (shared / "_shapes.yaml").write_text(FOLDER_TASK.replace("task: shapes_upper\n", ""))
    (shared / "shapes_utils.py").write_text("def to_answer(row):\n    return {**row, 'answer': 'from shared'}\n")
    (tasks / "shapes.yaml").write_text("include: ../shared/_shapes.yaml\ntask: shapes_upper\n")
    rows = datasets.Dataset.from_dict({"image": [shape_image("red", "circle")]})
    ex = TaskDataset(rows, get_task("shapes_upper", [tasks]), with_target=True)[0]
    assert ex.target == "from shared"
    (tasks / "shapes_utils.py").write_text("def to_answer(row):\n    return {**row, 'answer': 'beside'}\n")
    (tasks / "more.yaml").write_text("include: ../shared/_shapes.yaml\ntask: shapes_more\n"
                                     "row_map: shapes_utils:to_answer\n")  # the including file's own row_map
    assert TaskDataset(rows, get_task("shapes_more", [tasks]), with_target=True)[0].target == "beside"


def test_a_row_map_module_imports_its_neighbours_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """``from helper import x`` in a row-map module failed (its folder is not importable). Now each row map gets
    the helper beside it (two folders, one helper name), a module named json.py shadows nothing, and neither the
    folders nor the helpers stay on sys.path / in sys.modules to clash with installed modules later."""
    rows = datasets.Dataset.from_dict({"image": [shape_image("red", "circle")]})
    for name, word in (("a", "alpha"), ("b", "beta")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "shapes.yaml").write_text(FOLDER_TASK.replace("shapes_upper", f"shapes_{name}").replace(
            "shapes_utils:to_answer", "json:to_answer"))
        (folder / "json.py").write_text("import json\nfrom helper import WORD\n\n\ndef to_answer(row):\n"
                                        "    return {**row, 'answer': json.dumps(WORD)}\n")
        (folder / "helper.py").write_text(f"WORD = {word!r}\n")
        task = get_task(f"shapes_{name}", [folder])
        assert TaskDataset(rows, task, with_target=True)[0].target == f'"{word}"'
        assert str(folder) not in sys.path and "helper" not in sys.modules
    assert json.dumps([1]) == "[1]" and json.__file__ != str(tmp_path / "b" / "json.py")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (FOLDER_TASK.replace("shapes_utils:to_answer", "missing_mod:fn"), "missing_mod.py, which does not exist"),
        (FOLDER_TASK.replace("shapes_utils:to_answer", "not a ref"), "row_map must be 'module:function'"),
        (FOLDER_TASK + "multi_image: mosaic\n", "multi_image must be one of first, tile"),
        (FOLDER_TASK.replace("task: shapes_upper", "task: 's/{subset}'") + "subsets: 3\n", "'subsets' must be"),
        (FOLDER_TASK.replace("metric: exact_match", "metric: [exact_match, cidr]"), "unknown metric 'cidr'"),
    ],
)
def test_broken_task_options_exit_2_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "bad.yaml").write_text(content)
    (tmp_path / "shapes_utils.py").write_text("def to_answer(row):\n    return row\n")
    result = runner.invoke(app, ["tasks", "list", "--tasks-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "bad.yaml" in result.output and problem in result.output and "Traceback" not in result.output


@pytest.fixture()
def plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The example plugin as pip would leave it: its package on sys.path plus a dist-info with its entry points
    (written from its own pyproject.toml, so the test and the example cannot drift apart)."""
    project = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "site" / f"florence_kit_plugin_example-{project['version']}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = project["entry-points"]["florence_kit.tasks"]
    (dist / "entry_points.txt").write_text("[florence_kit.tasks]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return PLUGIN_DIR


def test_example_plugin_task_is_listed_and_trains(plugin_installed, tiny_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 0, result.output
    assert "shape_colour" in result.stdout and "colour_match" in result.stdout
    spec = get_task("shape_colour")
    assert spec.origin.endswith("shape_colour.yaml") and "florence-kit-plugin-example" in spec.origin
    assert get_metric("colour_match").score("Crimson", ["red"]) == 1.0  # the plugin's metric is registered
    colours = ["red", "blue", "green", "red", "blue", "green"]
    rows = datasets.Dataset.from_dict({"image": [shape_image(c, "circle") for c in colours], "colour": colours})
    data = tmp_path / "shapes"
    datasets.DatasetDict({"train": rows, "validation": rows.select(range(3))}).save_to_disk(str(data))
    _finetune("shape_colour", tiny_dir, data, tmp_path / "ft")
    metrics, _ = _eval("shape_colour", tmp_path / "ft", data, tmp_path / "ev")
    assert metrics["metric"] == "colour_match" and metrics["n_scored"] == 3


def test_plugin_task_clashing_with_a_builtin_names_both(plugin_installed, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "dup.yaml").write_text(FOLDER_TASK.replace("shapes_upper", "shape_colour").replace(
        "row_map: shapes_utils:to_answer\n", ""))
    with pytest.raises(UserError) as err:
        all_tasks([tmp_path / "t"])
    assert "'shape_colour' is defined twice" in str(err.value)
    assert str(tmp_path / "t" / "dup.yaml") in str(err.value) and "shape_colour.yaml" in str(err.value)


def test_a_broken_plugin_is_one_line_and_hides_no_other_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plugin that failed to import stopped `tasks list` before any task was shown, and one whose function
    raised was a traceback; each is now one line naming the plugin and the fix, the other tasks are listed, exit 2."""
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[florence_kit.tasks]\ngone = no_such_module_xyz\nraising = raiser:tasks\n")
    (tmp_path / "raiser.py").write_text("def tasks():\n    raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "docvqa" in result.stdout and "cauldron/ai2d" in result.stdout
    assert "plugin 'gone' (no_such_module_xyz) failed to load (ModuleNotFoundError" in result.output
    assert "plugin 'raising' (raiser:tasks) failed to list its tasks (RuntimeError: boom)" in result.output
    assert result.output.count("pip uninstall broken-plugin") == 2
    with pytest.raises(UserError, match="plugin 'gone'.*and 1 more"):  # other commands stop, naming it
        get_task("docvqa")


@pytest.mark.slow
def test_example_plugin_pip_installs(tmp_path: Path) -> None:
    """The real thing: pip builds and installs the example, a fresh process lists its task."""
    import os
    import subprocess

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN_DIR)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)]), "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-c", "from florence_kit.cli import main; main()", "tasks", "list"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "shape_colour" in out and "colour_match" in out
