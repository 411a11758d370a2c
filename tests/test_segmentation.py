"""Florence-2's whole region vocabulary: polygons in the processor's own grammar, boxes in prompts, the
segmentation / region-in / open-vocabulary / proposal tasks' data, their metrics on hand-made answers, drawing, and
segmentation training and scoring on the tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import warnings
from pathlib import Path

import datasets
import pytest
from support import polygons_to_mask
from synthetic_regions import PHRASES, segmentation_splits, shape_scenes, write_coco
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.geometry import (
    box_prompt,
    clip_polygon,
    decode_answers,
    encode_polygons,
    ensure_parse_config,
    parse_polygons,
    parse_proposals,
    polygon_bins,
    self_intersects,
)
from florence_kit.common.masks import mask_to_polygons, rle_to_polygons
from florence_kit.data.dataset import TaskDataset, load_source
from florence_kit.data.region_targets import RegionCounts
from florence_kit.data.region_units import region_units, shape_counts
from florence_kit.metrics import get_metric
from florence_kit.tasks.registry import get_task

runner = CliRunner()
# masks are rasterised and scored by pycocotools (the [detection] extra): only the tests that do so need it
needs_pycocotools = pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None,
                                       reason="needs pycocotools: pip install 'florence-kit[detection]'")
NEW_TASKS = ("segmentation", "region-segmentation", "region-category", "region-description", "region-ocr",
             "open-vocab-od", "region-proposal")


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_dir))
    ensure_parse_config(proc)
    return proc


def _star(cx: float, cy: float, r1: float, r2: float, n: int) -> list[float]:
    return [v for k in range(2 * n) for v in (cx + (r1 if k % 2 == 0 else r2) * math.cos(math.pi * k / n),
                                              cy + (r1 if k % 2 == 0 else r2) * math.sin(math.pi * k / n))]


# ---------------------------------------------------------------------------------------------
# Geometry: the processor's grammar


@pytest.mark.parametrize("size", [(128, 128), (640, 480), (37, 1001), (4000, 3)])
def test_polygons_round_trip_within_one_bin_and_the_processor_reads_them_the_same(processor, size) -> None:
    w, h = size
    border = [0.0, 0.0, float(w), 0.0, float(w), float(h), 0.0, float(h)]  # touches all four borders
    notch = [0.0, 0.0, float(w), 0.0, float(w), float(h), w / 2, h / 3, 0.0, float(h)]  # concave
    star = _star(w / 2, h / 2, min(w, h) / 2, min(w, h) / 5, 7)  # concave, 14 vertices
    for polygon in (border, notch, star):
        back = parse_polygons(encode_polygons([[polygon]], size), size)["polygons"]
        assert len(back) == 1 and len(back[0]) == 1
        points = list(zip(back[0][0][0::2], back[0][0][1::2], strict=True))
        truth = list(zip(polygon[0::2], polygon[1::2], strict=True))
        assert len(points) == len(polygon_bins(polygon, size)) <= len(truth)
        j = 0  # every point comes back, in order, within half a bin (one bin at most) of its vertex
        for x, y in points:
            while not (abs(x - truth[j][0]) <= w / 2000 + 1e-9 and abs(y - truth[j][1]) <= h / 2000 + 1e-9):
                j += 1
    objects = [[border], [notch, star], [star]]  # three objects, the second in two parts
    for objs in ([objects[1]], objects):
        text = encode_polygons(objs, size)
        assert ("<poly>" in text) == (len(objs) > 1) and text.count("<sep>") == 1
        for token in ("<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>"):
            native = processor.post_process_generation(text, task=token, image_size=size)[token]
            assert native == parse_polygons(text, size, whole_pixels=True)
            assert [len(o) for o in native["polygons"]] == [len(o) for o in sorted(objs, key=len, reverse=True)] or \
                len(native["polygons"]) == len(objs)
    text = encode_polygons(objects, size, label="a red star")
    native = processor.post_process_generation(text, task="<OPEN_VOCABULARY_DETECTION>", image_size=size)
    native = native["<OPEN_VOCABULARY_DETECTION>"]
    ours = parse_polygons(text, size, whole_pixels=True, labelled=True)
    assert native["polygons"] == ours["polygons"] and native["polygons_labels"] == ours["labels"] == ["a red star"] * 3
    boxes = "".join(box_prompt([10, 20, 30 + k, 40], size) for k in range(3))
    assert processor.post_process_generation(boxes, task="<REGION_PROPOSAL>", image_size=size)["<REGION_PROPOSAL>"] \
        == parse_proposals(boxes, size, whole_pixels=True)


def test_the_parser_is_the_processors_on_any_token_soup(processor) -> None:
    rng = random.Random(0)
    pieces = ["<loc_0>", "<loc_5>", "<loc_999>", "<loc_500>", "<sep>", "<poly>", "</poly>", "cat", " ", "a b", "<s>"]
    size = (640, 480)
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        native = processor.post_process_generation(text, task="<REFERRING_EXPRESSION_SEGMENTATION>", image_size=size)
        assert native["<REFERRING_EXPRESSION_SEGMENTATION>"] == parse_polygons(text, size, whole_pixels=True), text
        if "<poly>" in text:
            ovd = processor.post_process_generation(text, task="<OPEN_VOCABULARY_DETECTION>", image_size=size)
            ours = parse_polygons(text, size, whole_pixels=True, labelled=True)
            assert ovd["<OPEN_VOCABULARY_DETECTION>"]["polygons"] == ours["polygons"], text
        native = processor.post_process_generation(text, task="<REGION_PROPOSAL>", image_size=size)
        assert native["<REGION_PROPOSAL>"] == parse_proposals(text, size, whole_pixels=True), text


def test_object_order_and_the_exact_form() -> None:
    size = (100, 100)
    late = [[50, 50, 60, 50, 60, 60, 50, 60], [20, 20, 30, 20, 30, 30]]  # two parts: the larger first
    early = [[0, 0, 10, 0, 10, 10]]
    assert encode_polygons([late, early], size) == (
        "<poly><loc_0><loc_0><loc_100><loc_0><loc_100><loc_100></poly>"
        "<poly><loc_500><loc_500><loc_600><loc_500><loc_600><loc_600><loc_500><loc_600><sep>"
        "<loc_200><loc_200><loc_300><loc_200><loc_300><loc_300></poly>")
    assert encode_polygons([[[5, 5, 5.01, 5.01, 5, 5]]], size) == ""  # under three distinct bins: nothing to draw
    assert box_prompt([10, 20, 99.99, 100], size) == "<loc_100><loc_200><loc_999><loc_999>"


def test_box_in_the_prompt_reaches_the_model_as_location_tokens(processor) -> None:
    prompt = "<REGION_TO_CATEGORY>" + box_prompt([12, 34, 56, 78], (128, 128))
    text = processor._construct_prompts([prompt])[0]  # what the processor feeds the tokenizer
    assert text == "What is the region <loc_93><loc_265><loc_437><loc_609>?"
    tokens = processor.tokenizer.tokenize(text)
    assert [t for t in tokens if t.startswith("<loc_")] == ["<loc_93>", "<loc_265>", "<loc_437>", "<loc_609>"]


def test_polygon_separators_survive_decoding_where_the_tokenizer_calls_them_special(tiny_dir: Path) -> None:
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_dir))
    proc.tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>", "<poly>", "</poly>"]})  # Microsoft's
    text = "<poly><loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><sep><loc_7><loc_8><loc_9><loc_9><loc_1><loc_1></poly>"
    ids = [proc.tokenizer.bos_token_id, *proc.tokenizer(text, add_special_tokens=False)["input_ids"],
           proc.tokenizer.eos_token_id]
    assert "<sep>" not in proc.batch_decode([ids], skip_special_tokens=True)[0]
    assert decode_answers(proc, [ids]) == [text]


def test_clipping_and_self_intersection() -> None:
    assert clip_polygon([-10, -10, 50, -10, 50, 50, -10, 50], (40, 30)) == [0, 30, 0, 0, 40, 0, 40, 30]
    assert clip_polygon([100, 100, 120, 100, 110, 120], (40, 30)) == []
    inside = [1.5, 2, 30, 2, 20, 20]
    assert clip_polygon(inside, (40, 30)) == inside  # untouched, same start point
    assert self_intersects([0, 0, 10, 10, 10, 0, 0, 10])  # a bow tie
    assert not self_intersects([0, 0, 10, 0, 10, 10, 5, 3, 0, 10])  # concave is fine


@needs_pycocotools
def test_masks_trace_to_polygons_that_rasterise_back() -> None:
    np = pytest.importorskip("numpy")
    from PIL import Image, ImageDraw

    from florence_kit.common.masks import coco_mask

    im = Image.new("L", (200, 150), 0)
    draw = ImageDraw.Draw(im)
    draw.ellipse([20, 20, 120, 110], fill=1)
    draw.ellipse([50, 50, 80, 80], fill=0)  # a hole
    draw.polygon([(150, 10), (199, 10), (199, 149), (170, 149), (185, 60)], fill=1)  # concave, on the border
    mask = np.array(im, dtype=np.uint8)
    exact, holes = mask_to_polygons(mask, tolerance=0)
    assert holes == 1 and len(exact) == 2
    filled = polygons_to_mask(exact, (200, 150)).astype(bool)
    assert filled[65, 65] and not mask[65, 65] and (filled | ~mask.astype(bool)).all()  # the hole is filled
    simplified, _ = mask_to_polygons(mask)
    back = polygons_to_mask(simplified, (200, 150)).astype(bool)
    iou = (back & filled).sum() / (back | filled).sum()
    assert iou > 0.97 and sum(len(p) for p in simplified) < sum(len(p) for p in exact) / 4
    rle = coco_mask().encode(np.asfortranarray(mask))
    assert rle_to_polygons({"size": rle["size"], "counts": rle["counts"].decode()}) == (simplified, 1)


# ---------------------------------------------------------------------------------------------
# Data


def _units(task: str, row: dict, names=None, counts=None):
    counts = counts if counts is not None else RegionCounts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return region_units(get_task(task).regions, row, "image", names, counts), counts


def _image(w: int = 100, h: int = 50):
    from PIL import Image

    return Image.new("RGB", (w, h), "white")


SQUARE = [10, 10, 30, 10, 30, 30, 10, 30]
TRIANGLE = [50, 5, 70, 40, 40, 40]


@needs_pycocotools
def test_segmentation_gives_one_example_per_phrase_with_every_object_it_names() -> None:
    row = {"image": _image(), "objects": [
        {"bbox": [10, 10, 20, 20], "category": "cat", "segmentation": [SQUARE]},
        {"bbox": [40, 5, 30, 35], "category": "dog", "segmentation": [TRIANGLE]},
        {"bbox": [80, 5, 10, 10], "category": "cat", "segmentation": [[80, 5, 90, 5, 90, 15]]}]}
    units, _ = _units("segmentation", row)
    assert [u["phrase"] for u in units] == ["cat", "dog"]  # no phrase key: objects are named by their class
    cats = parse_polygons(units[0]["target"], (100, 50))["polygons"]
    assert len(cats) == 2 and units[0]["target"].startswith("<poly>")
    ref = json.loads(units[0]["references"][0])
    assert ref["phrase"] == "cat" and ref["labels"] == ["cat", "cat"] and len(ref["polygons"]) == 2
    assert get_metric("mask_map").compute([u["target"] for u in units], [u["references"] for u in units])[1] == \
        pytest.approx(1.0)
    dog = parse_polygons(units[1]["target"], (100, 50))["polygons"]
    assert len(dog) == 1 and "<poly>" not in units[1]["target"]  # one object: bare, as Florence-2 writes it


def test_region_in_tasks_give_one_example_per_object_with_its_box_in_the_prompt() -> None:
    row = {"image": _image(), "objects": {"bbox": [[10, 10, 20, 20], [40, 5, 30, 35], [5, 5, 0, 10]],
                                          "category": [0, 1, 0], "segmentation": [[SQUARE], [TRIANGLE], [SQUARE]],
                                          "phrase": [["a small cat", "the cat"], "a dog", "x"]}}
    units, counts = _units("region-category", row, names=["cat", "dog"])
    assert [(u["region"], u["target"]) for u in units] == [
        ("<loc_100><loc_200><loc_300><loc_600>", "cat"), ("<loc_400><loc_100><loc_700><loc_800>", "dog")]
    assert counts.dropped == 1  # the box with no area makes no example, counted
    units, _ = _units("region-description", row, names=["cat", "dog"])
    assert units[0]["target"] == "a small cat" and units[0]["references"] == ["a small cat", "the cat"]
    units, _ = _units("region-segmentation", row, names=["cat", "dog"])
    assert len(units) == 2 and units[1]["target"].count("<loc_") == 6  # the triangle, bare
    assert json.loads(units[1]["references"][0])["polygons"] == [[[50, 5, 70, 40, 40, 40]]]
    units, _ = _units("region-proposal", row, names=["cat", "dog"])
    assert len(units) == 1 and units[0]["target"] == (  # top edge first: the dog (y 5), then the cat (y 10)
        "<loc_400><loc_100><loc_700><loc_800><loc_100><loc_200><loc_300><loc_600>")
    units, _ = _units("open-vocab-od", row, names=["cat", "dog"])
    assert [u["phrase"] for u in units] == ["a small cat", "the cat", "a dog"]
    assert units[2]["target"] == "a dog<loc_400><loc_100><loc_700><loc_800>"


def test_region_ocr_reads_the_ocr_region_data_one_line_each() -> None:
    row = {"image": _image(), "objects": {"quad": [[10, 10, 40, 10, 40, 20, 10, 20]], "text": ["café 12"]}}
    units, _ = _units("region-ocr", row)
    assert units == [{"target": "café 12", "references": ["café 12"], "region": "<loc_100><loc_200><loc_400><loc_400>",
                      "phrase": ""}]


def test_bad_polygons_are_clipped_dropped_and_counted() -> None:
    row = {"image": _image(), "objects": [
        {"bbox": None, "category": "a", "segmentation": [[-10, 10, 30, 10, 30, 30]]},  # partly outside: clipped
        {"bbox": None, "category": "a", "segmentation": [[10, 10, 20, 20]]},  # two points: dropped
        {"bbox": None, "category": "a", "segmentation": [[200, 200, 220, 200, 210, 220]]},  # outside: dropped
        {"bbox": None, "category": "a", "segmentation": [[0, 0, 10, 10, 10, 0, 0, 10]]},  # a bow tie: kept
        {"bbox": None, "category": "a", "segmentation": {"counts": "abc"}},  # RLE without size: dropped
        {"bbox": None, "category": "b", "segmentation": []}]}  # no mask at all
    units, counts = _units("segmentation", row)
    shapes = shape_counts(counts)
    assert (shapes.polygons, shapes.clipped, shapes.dropped, shapes.few_points) == (4, 1, 2, 1)
    assert (shapes.self_intersecting, shapes.rle_without_size, shapes.no_mask) == (1, 1, 4)
    assert [u["phrase"] for u in units] == ["a"] and len(json.loads(units[0]["references"][0])["polygons"]) == 2
    assert str(shapes).startswith("4 polygons: 1 clipped to the image, 2 dropped (1 with under 3 points")


def test_a_referring_row_without_its_phrase_is_counted_and_left_out() -> None:
    rows = [{"image": _image(), "phrase": ["the left one", "left"], "bbox": [10, 10, 20, 20], "segmentation": [SQUARE]},
            {"image": _image(), "phrase": None, "bbox": [10, 10, 20, 20], "segmentation": [SQUARE]},
            {"image": _image(), "phrase": "  ", "bbox": [10, 10, 20, 20], "segmentation": [SQUARE]}]
    spec = get_task("segmentation")
    spec = spec.__class__(**{**spec.__dict__, "regions": {**spec.regions, "objects": "."}})  # RefCOCO-style rows
    counts = RegionCounts()
    found = []
    for row in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found += region_units(spec.regions, row, "image", None, counts)
    assert [u["phrase"] for u in found] == ["the left one", "left"]  # one example per expression
    assert shape_counts(counts).no_phrase == 2


def test_a_task_whose_data_lacks_masks_exits_2_naming_the_key(tiny_dir: Path, tmp_path: Path) -> None:
    from florence_kit.common.errors import UserError

    with pytest.raises(UserError, match=r"column 'objects' have no 'segmentation' \(keys: bbox, category\)"):
        _units("segmentation", {"image": _image(), "objects": {"bbox": [[1, 2, 3, 4]], "category": ["a"]}})
    data = tmp_path / "d"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [_image()], "objects": [
        {"bbox": [[1, 2, 3, 4]], "category": ["a"]}]})}).save_to_disk(str(data))
    result = runner.invoke(app, ["eval", "segmentation", "--dataset", str(data), "--split", "train",
                                 "--model", str(tiny_dir), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "have no 'segmentation'" in result.output


@needs_pycocotools
def test_coco_folder_with_polygons_and_rle_loads_and_counts_holes(tmp_path: Path) -> None:
    scenes = {"train": shape_scenes(6, seed=0), "validation": shape_scenes(3, seed=1)}
    poly_dir = write_coco(scenes, tmp_path / "poly", masks="polygons")
    rle_dir = write_coco(scenes, tmp_path / "rle", masks="rle")
    spec = get_task("segmentation")
    a = TaskDataset(load_source(str(poly_dir))["train"], spec, with_target=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = TaskDataset(load_source(str(rle_dir))["train"], spec, with_target=True)
    n_phrases = sum(len(set(s.labels)) for s in scenes["train"])
    assert len(a) == len(b) == n_phrases
    assert [a[i].prompt for i in range(len(a))] == [b[i].prompt for i in range(len(b))]
    targets = [a[i].target for i in range(len(a))]
    assert [t for _, _, t in a.texts()] == targets  # the preflight (no images) renders the same
    truth = [a[i].references for i in range(len(a))]
    # the RLE masks traced back to polygons score ~1 against the polygon truth
    assert get_metric("mean_iou").compute([b[i].target for i in range(len(b))], truth)[1] > 0.9


# ---------------------------------------------------------------------------------------------
# Metrics on hand-made answers (image 1000 x 1000: one bin is one pixel)

SIZE = (1000, 1000)


def _seg_ref(phrase: str, objects: list) -> list[str]:
    return [json.dumps({"size": list(SIZE), "phrase": phrase, "labels": [phrase] * len(objects), "polygons": objects,
                        "boxes": [[0, 0, 1, 1]] * len(objects)})]


def _rect(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """A rectangle with corners at bin centres (+0.5 px here), where a parsed answer puts them."""
    x1, y1, x2, y2 = x1 + 0.5, y1 + 0.5, x2 + 0.5, y2 + 0.5
    return [x1, y1, x2, y1, x2, y2, x1, y2]


@needs_pycocotools
def test_mean_iou_on_hand_made_masks() -> None:
    refs = [_seg_ref("a", [[_rect(100, 100, 400, 400)]]), _seg_ref("b", [[_rect(0, 0, 100, 100)]])]
    half = encode_polygons([[_rect(100, 100, 400, 250)]], SIZE)  # the top half of the true square
    exact = encode_polygons([[_rect(0, 0, 100, 100)]], SIZE)
    per_sample, total, details = get_metric("mean_iou").compute_with_details([half, exact], refs)
    # polygons go through 1000 location bins and are rasterised: each edge moves by up to a bin, ~1% of these IoUs
    assert per_sample == pytest.approx([0.5, 1.0], abs=0.01) and total == pytest.approx(0.75, abs=0.01)
    assert details["ciou"] == pytest.approx((150 * 300 + 100 * 100) / (300 * 300 + 100 * 100), abs=0.01)
    assert details["precision_50"] == 1.0
    assert get_metric("mean_iou").compute(["", exact], refs)[1] == pytest.approx(0.5, abs=0.01)  # no answer: 0


@needs_pycocotools
def test_mask_map_over_the_whole_set() -> None:
    square, far = _rect(100, 100, 400, 400), _rect(600, 600, 900, 900)
    refs = [_seg_ref("cat", [[square]]) for _ in range(4)]
    good = encode_polygons([[square]], SIZE)
    assert get_metric("mask_map").compute([good] * 4, refs)[1] == pytest.approx(1.0)
    one_missed = [good] * 3 + [encode_polygons([[far]], SIZE)]
    # 4 true cats, 3 found with one false positive at the same (tied) score: precision 3/4 up to recall 3/4
    # (an AP is a sum of 101 interpolated precisions: exact up to float rounding, 1e-3 is one point's 1/10)
    assert get_metric("mask_map").compute(one_missed, refs)[1] == pytest.approx(0.75 * 76 / 101, abs=1e-3)
    # a mask covering 170 of the square's 300 rows (IoU .567) counts at thresholds .5 and .55 only: 2 of the 10
    shifted = encode_polygons([[_rect(100, 100, 400, 270)]], SIZE)
    per_sample, total, details = get_metric("mask_map").compute_with_details([shifted], refs[:1])
    assert total == pytest.approx(0.2, abs=1e-3) and details["map_50"] == pytest.approx(1.0)
    assert per_sample == pytest.approx([170 / 300], abs=0.01)


def test_proposal_recall() -> None:
    ref = [json.dumps({"size": list(SIZE), "labels": ["", ""], "boxes": [[10, 10, 100, 100], [500, 500, 600, 600]]})]
    text = box_prompt([10, 10, 100, 100], SIZE) + box_prompt([0, 900, 50, 999], SIZE)
    assert get_metric("proposal_recall").compute([text], [ref])[1] == 0.5


# ---------------------------------------------------------------------------------------------
# The tasks train, evaluate and are seen


def test_tasks_list_shows_the_new_tasks_with_their_metrics(tmp_path: Path) -> None:
    result = runner.invoke(app, ["tasks", "list"])
    assert result.exit_code == 0, result.output
    lines = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    for name in NEW_TASKS:
        assert name in lines, name
    assert lines["segmentation"][2] == "mask_map, mean_iou" and lines["region-ocr"][2] == "cer, exact_match"


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "data"
    segmentation_splits({"train": shape_scenes(8, 0), "validation": shape_scenes(4, 1)}, phrases=True) \
        .save_to_disk(str(out))
    return out


@needs_pycocotools
def test_segmentation_trains_and_evaluates_on_the_tiny_model(tiny_dir: Path, seg_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", "segmentation", "--model", str(tiny_dir), "--dataset", str(seg_dir),
                                 "--output-dir", str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "4",
                                 "--lr", "1e-3", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "segmentation", "--model", str(tmp_path / "ft"), "--dataset", str(seg_dir),
                                 "--output-dir", str(tmp_path / "ev"), "--quiet", "--max-new-tokens", "24",
                                 "--split", "validation"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    n_examples = sum(len(set(s.labels)) for s in shape_scenes(4, 1))
    assert metrics["metric"] == "mask_map" and metrics["n_scored"] == n_examples == len(preds)
    assert 0.0 <= metrics["mask_map"] <= 1.0 and 0.0 <= metrics["mean_iou"] <= 1.0
    assert {p["prompt"] for p in preds} <= {f"<REFERRING_EXPRESSION_SEGMENTATION>{p}" for p in PHRASES.values()}
    truth = [p["references"] for p in preds]
    perfect = [encode_polygons(json.loads(r[0])["polygons"], tuple(json.loads(r[0])["size"])) for r in truth]
    assert get_metric("mask_map").compute(perfect, truth)[1] == pytest.approx(1.0)  # the references round trip
    assert get_metric("mean_iou").compute(perfect, truth)[1] > 0.97
    rescored = runner.invoke(app, ["score", "segmentation", str(tmp_path / "ev" / "predictions.jsonl"), "--json"])
    assert json.loads(rescored.stdout)["mask_map"] == pytest.approx(metrics["mask_map"])
    html = runner.invoke(app, ["report", str(tmp_path / "ev")])
    assert html.exit_code == 0, html.output


@pytest.mark.parametrize("task", ["region-category", pytest.param("region-proposal", marks=pytest.mark.slow)])
def test_region_in_and_proposal_tasks_train_and_evaluate(task: str, tiny_dir: Path, seg_dir: Path,
                                                        tmp_path: Path) -> None:
    result = runner.invoke(app, ["finetune", task, "--model", str(tiny_dir), "--dataset", str(seg_dir),
                                 "--output-dir", str(tmp_path / "ft"), "--max-steps", "2", "--batch-size", "4",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", task, "--model", str(tmp_path / "ft"), "--dataset", str(seg_dir),
                                 "--output-dir", str(tmp_path / "ev"), "--quiet", "--max-new-tokens", "8",
                                 "--split", "validation"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    scenes = shape_scenes(4, 1)
    assert metrics["n_scored"] == (sum(len(s.labels) for s in scenes) if task == "region-category" else len(scenes))


def test_predict_takes_a_box_for_region_in_tasks(tiny_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    shape_scenes(2, seed=3)[1].image.save(page)
    result = runner.invoke(app, ["predict", str(page), "--task", "region-category", "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "--box" in result.output
    result = runner.invoke(app, ["predict", str(page), "--task", "region-category", "--model", str(tiny_dir),
                                 "--box", "10,10,5,60"])
    assert result.exit_code == 2 and "x2 > x1" in result.output
    result = runner.invoke(app, ["predict", str(page), "--task", "region-category", "--model", str(tiny_dir),
                                 "--box", "10,10,60,60"])
    assert result.exit_code == 0, result.output


def test_polygons_are_drawn_filled_and_the_report_shows_true_beside_predicted(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from florence_kit.evaluate.scoring import thumbnail_jpeg
    from florence_kit.present.draw import draw_regions, overlay_thumbnail

    image = Image.new("RGB", (200, 100), "white")
    drawn = draw_regions(image, {"polygons": [[[20, 20, 80, 20, 80, 80, 20, 80]]], "labels": [""]})
    inside, outside = drawn.getpixel((50, 50)), drawn.getpixel((150, 50))
    assert inside != (255, 255, 255) and min(inside) > 100 and outside == (255, 255, 255)  # filled, see-through
    ref = json.dumps({"size": [200, 100], "phrase": "x", "labels": ["x"], "boxes": [[20, 20, 80, 80]],
                      "polygons": [[[20, 20, 80, 20, 80, 80, 20, 80]]]})
    rec = {"prompt": "<REFERRING_EXPRESSION_SEGMENTATION>x", "references": [ref],
           "prediction": encode_polygons([[[120, 20, 180, 20, 180, 80, 120, 80]]], (200, 100))}
    thumb = Image.open(io.BytesIO(overlay_thumbnail(thumbnail_jpeg(image, 200), rec)))
    assert thumb.size == (404, 100)  # true | predicted
    left, right = thumb.getpixel((50, 50)), thumb.getpixel((204 + 150, 50))
    assert left[1] > left[0] and right[0] > right[1]  # green truth on the left, red prediction on the right
    box_rec = {"prompt": "<REGION_TO_CATEGORY>" + box_prompt([20, 20, 80, 80], (200, 100)), "references": ["cat"],
               "prediction": "cat"}
    boxed = Image.open(io.BytesIO(overlay_thumbnail(thumbnail_jpeg(image, 200), box_rec)))
    assert boxed.getpixel((50, 21))[2] > 150  # the prompt's box, in blue


def test_serve_fills_a_region_in_prompt_from_the_box_field() -> None:
    from types import SimpleNamespace

    from florence_kit.common.errors import UserError
    from florence_kit.present.serve import Predictor

    predictor = Predictor(None, SimpleNamespace(tasks_answer_post_processing_type={}),
                          {"region-category": get_task("region-category")})
    assert predictor.prompt_for("region-category", "", "32, 32, 96, 64", (128, 128))[0] == \
        "<REGION_TO_CATEGORY><loc_250><loc_250><loc_750><loc_500>"
    assert predictor.prompt_for("<REGION_TO_OCR>", "", "0,0,128,128", (128, 128))[0] == \
        "<REGION_TO_OCR><loc_0><loc_0><loc_999><loc_999>"
    with pytest.raises(UserError, match="needs a box"):
        predictor.prompt_for("region-category", "", "", (128, 128))
    with pytest.raises(UserError, match="four numbers"):
        predictor.prompt_for("<REGION_TO_CATEGORY>", "", "1,2,3", (128, 128))


@needs_pycocotools
def test_open_vocab_od_with_polygons_writes_the_phrase_then_poly_blocks(processor) -> None:
    spec = get_task("open-vocab-od")
    regions = {**spec.regions, "shape": "polygons"}
    row = {"image": _image(), "objects": [{"bbox": [10, 10, 20, 20], "phrase": "a box", "segmentation": [SQUARE]},
                                          {"bbox": [40, 5, 30, 35], "phrase": "a box", "segmentation": [TRIANGLE]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        units = region_units(regions, row, "image", None, RegionCounts())
    assert len(units) == 1 and units[0]["target"].startswith("a box<poly>") and units[0]["target"].count("<poly>") == 2
    native = processor.post_process_generation(units[0]["target"], task="<OPEN_VOCABULARY_DETECTION>",
                                               image_size=(100, 50))["<OPEN_VOCABULARY_DETECTION>"]
    assert native["polygons_labels"] == ["a box", "a box"] and native["bboxes"] == []
    refs = [units[0]["references"]]
    assert get_metric("mask_map").compute([units[0]["target"]], refs)[1] == pytest.approx(1.0)


@needs_pycocotools
def test_coco_rle_holes_are_filled_and_counted_when_loading(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    from PIL import Image

    from florence_kit.common.masks import coco_mask

    root = tmp_path / "ring"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 40), "white").save(root / "images" / "a.png")
    ring = np.zeros((40, 40), np.uint8)
    ring[5:35, 5:35] = 1
    ring[15:25, 15:25] = 0
    rle = coco_mask().encode(np.asfortranarray(ring))
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 30, 30], "iscrowd": 0,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0,
                    "segmentation": {"counts": "abc"}}]
    (root / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40}], "annotations": annotations,
        "categories": [{"id": 1, "name": "ring"}]}))
    with pytest.warns(UserWarning, match=r"1 hole\(s\) filled .* 1 mask\(s\) without a size left out"):
        ds = load_source(str(root))["train"]
    assert ds[0]["objects"]["segmentation"][0] == [[5.0, 5.0, 35.0, 5.0, 35.0, 35.0, 5.0, 35.0]]


def test_refcoco_style_rows_load_through_a_task_file(tmp_path: Path) -> None:
    """One referred object per row (RefCOCO's layout): `objects: "."` reads phrase, bbox and segmentation from the
    row's own columns; each expression is one example, a row without one is counted and left out."""
    from florence_kit.tasks.spec import load_task_specs

    (tmp_path / "refseg.yaml").write_text(
        "task: refseg\nprompt: '<REFERRING_EXPRESSION_SEGMENTATION>{phrase}'\ntarget: '{target}'\n"
        "references: references\nmetric: [mean_iou]\ndataset: {path: ./x}\n"
        "regions: {kind: segmentation, objects: '.', phrase: sentences, segmentation: mask}\n")
    (spec,) = load_task_specs(tmp_path / "refseg.yaml")
    rows = datasets.Dataset.from_dict({
        "image": [_image(), _image()], "bbox": [[10, 10, 20, 20], [40, 5, 30, 35]],
        "sentences": [["the square", "left box"], []], "mask": [[SQUARE], [TRIANGLE]]})
    with pytest.warns(UserWarning, match="bad boxes or polygons in the data"):  # the row without an expression
        data = TaskDataset(rows, spec, with_target=True)
    assert [data[i].prompt for i in range(len(data))] == [
        "<REFERRING_EXPRESSION_SEGMENTATION>the square", "<REFERRING_EXPRESSION_SEGMENTATION>left box"]
    assert data[0].target == encode_polygons([[SQUARE]], (100, 50)) and [data[i].id for i in range(2)] == ["0-0", "0-1"]
    prompts = [data[i].prompt for i in range(2)]
    assert [p for _, p, _ in data.texts()] == prompts  # the counts are of this one pass (finetune's preflight)
    assert (data.region_counts.shapes.no_phrase, data.region_counts.shapes.polygons) == (1, 2)  # each object once


def test_finetune_and_eval_get_one_line_of_polygon_counts_per_pass() -> None:
    from florence_kit.data.region_targets import bad_box_lines

    objects = [{"bbox": [[0, 0, 30, 30], [40, 5, 30, 35]], "category": ["a", "b"],
                "segmentation": [[[-10, 0, 30, 0, 30, 30]], [[1, 1, 2, 2]]]}]  # one clipped, one with 2 points
    rows = datasets.Dataset.from_dict({"image": [_image()] * 2, "width": [100] * 2, "height": [50] * 2,
                                       "objects": objects * 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = TaskDataset(rows, get_task("segmentation"), with_target=True)
        for _ in range(2):  # the preflight and a second read: counts are one pass's
            list(data.texts())
    assert bad_box_lines(data) == [
        "warning: bad polygons in the data: 4 polygons: 2 clipped to the image, 2 dropped (2 with under 3 points, 0 "
        "with nothing inside the image), 0 self-intersecting (kept as drawn), 0 holes filled, 0 RLE masks without a "
        "size (dropped); 2 objects without a mask, 0 with a blank phrase (left out)"]
