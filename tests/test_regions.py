"""Region tasks: `<loc_*>` targets that the native processor parses back, COCO / YOLO / hub data,
class-aware COCO mAP on hand-made predictions, and the four region tasks training and scoring on the tiny model."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import datasets
import pytest
from synthetic_regions import CLASSES, hub_splits, shape_scenes, text_scenes, write_coco, write_yolo
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.geometry import encode_regions, ensure_parse_config, iou, parse_boxes, parse_quads, quantize
from florence_kit.data.dataset import TaskDataset, load_source, load_split
from florence_kit.data.region_targets import RegionCounts, region_fields
from florence_kit.metrics import get_metric
from florence_kit.tasks.registry import get_task

runner = CliRunner()
TRAIN = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def processor(tiny_dir: Path):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(tiny_dir))
    ensure_parse_config(proc)
    return proc


@pytest.fixture(scope="module")
def scenes() -> dict:
    return {"train": shape_scenes(8, seed=0), "validation": shape_scenes(4, seed=1)}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory, scenes: dict) -> Path:
    return write_coco(scenes, tmp_path_factory.mktemp("coco") / "shapes")


@pytest.fixture(scope="module")
def yolo_dir(tmp_path_factory: pytest.TempPathFactory, scenes: dict) -> Path:
    return write_yolo(scenes, tmp_path_factory.mktemp("yolo") / "shapes")


# ---------------------------------------------------------------------------------------------
# The quantiser


def _random_boxes(rng: random.Random, size: tuple[int, int], n: int) -> list[list[float]]:
    w, h = size
    boxes = [[0.0, 0.0, float(w), float(h)],  # the whole image: touches every border
             [w - 1.0, h - 1.0, float(w), float(h)],  # a sliver in the bottom-right corner
             [w / 3, h / 3, w / 3, h / 3],  # degenerate: a point
             [0.0, h / 2, float(w), h / 2]]  # degenerate: a line along the whole width
    for _ in range(n):
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        boxes.append([x1, y1, x2, y2])
    return boxes


def _flat(rows: list[list[float]]) -> list[float]:
    return [float(v) for row in rows for v in row]


@pytest.mark.parametrize("size", [(128, 128), (640, 480), (37, 1001), (1000, 1000), (4000, 3)])
def test_encode_then_native_parse_gives_boxes_back_within_one_bin(processor, size: tuple[int, int]) -> None:
    rng = random.Random(size[0])
    boxes = _random_boxes(rng, size, 12)
    labels = [f"{CLASSES[k % 4]}" for k in range(len(boxes))]
    target = encode_regions(labels, boxes, size)
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0]))  # the documented target order
    bins = (size[0] / 1000, size[1] / 1000)
    for token in ("<OD>", "<DENSE_REGION_CAPTION>"):
        native = processor.post_process_generation(target, task=token, image_size=size)[token]
        assert native == parse_boxes(target, size, whole_pixels=True)  # our parser is the processor's
        assert native["labels"] == [labels[i] for i in order]  # "traffic-light" and "class 2" survive
        centres = parse_boxes(target, size)["bboxes"]
        for got, pixels, i in zip(centres, native["bboxes"], order, strict=True):
            for k, (g, p, t) in enumerate(zip(got, pixels, boxes[i], strict=True)):
                assert abs(g - t) <= bins[k % 2] / 2 + 1e-9, (k, g, t)  # the bin centre: within half a bin
                assert p == int(g) and abs(p - t) < bins[k % 2] / 2 + 1  # the processor: centre cut to a pixel
    # OCR with regions: quadrilaterals, eight tokens each
    quads = [[b[0], b[1], b[2], b[1], b[2], b[3], b[0], b[3]] for b in boxes[:5]]
    words = ["cat", "traffic-light", "class 2", "x9", "a b"]
    target = encode_regions(words, quads, size)
    native = processor.post_process_generation(target, task="<OCR_WITH_REGION>", image_size=size)["<OCR_WITH_REGION>"]
    assert native == parse_quads(target, size, whole_pixels=True)
    assert sorted(native["labels"]) == sorted(words)
    for got in parse_quads(target, size)["quad_boxes"]:
        assert any(all(abs(g - t) <= bins[k % 2] / 2 + 1e-9 for k, (g, t) in enumerate(zip(got, q, strict=True)))
                   for q in quads)


def test_quantiser_is_the_native_one() -> None:
    import torch
    from transformers.models.florence2.processing_florence2 import Florence2PostProcessor

    post = Florence2PostProcessor.__new__(Florence2PostProcessor)
    post.quantize_bins = (1000, 1000)
    size = (333, 77)
    boxes = torch.tensor(_random_boxes(random.Random(0), size, 50))
    native = post.quantize(boxes, size).tolist()
    ours = [[quantize(b[0], 333), quantize(b[1], 77), quantize(b[2], 333), quantize(b[3], 77)] for b in boxes.tolist()]
    assert native == ours
    assert quantize(333, 333) == 999 and quantize(0, 333) == 0 and quantize(-5, 333) == 0


def test_target_order_is_top_left_to_bottom_right() -> None:
    target = encode_regions(["b", "a", "c"], [[50, 50, 60, 60], [5, 5, 9, 9], [1, 50, 2, 60]], (100, 100))
    assert target == ("a<loc_50><loc_50><loc_90><loc_90>c<loc_10><loc_500><loc_20><loc_600>"
                      "b<loc_500><loc_500><loc_600><loc_600>")


# ---------------------------------------------------------------------------------------------
# mAP on hand-made predictions


def _ref(labels: list[str], boxes: list[list[float]], size=(100, 100)) -> list[str]:
    return [json.dumps({"size": list(size), "labels": labels, "boxes": boxes})]


def _pred(labels: list[str], boxes: list[list[float]], size=(100, 100)) -> str:
    return "<s>" + "".join(f"{lab}" + "".join(f"<loc_{quantize(v, size[k % 2])}>" for k, v in enumerate(b))
                           for lab, b in zip(labels, boxes, strict=True)) + "</s>"


A = [[10, 10, 40, 40]]
B = [[50, 50, 90, 90]]


def test_map_perfect_prediction_is_one() -> None:
    refs = [_ref(["traffic-light"], A), _ref(["class 2", "traffic-light"], A + B)]
    preds = [_pred(["traffic-light"], A), _pred(["class 2", "traffic-light"], A + B)]
    per_sample, total, details = get_metric("coco_map").compute_with_details(preds, refs)
    assert total == pytest.approx(1.0) and per_sample == [1.0, 1.0]
    assert details["map_50"] == pytest.approx(1.0) and details["unknown_labels"] == 0
    assert details["ap_per_class"] == {"class 2": pytest.approx(1.0), "traffic-light": pytest.approx(1.0)}


def test_map_wrong_class_is_not_a_hit() -> None:
    refs = [_ref(["square"], A), _ref(["circle"], B)]
    preds = [_pred(["circle"], A), _pred(["circle"], B)]  # image 0: right box, wrong class
    _, total, details = get_metric("coco_map").compute_with_details(preds, refs)
    # circle: 1 true box, 2 detections with tied scores = one operating point: precision 1/2 at recall 1 ->
    # AP 0.5 ; square: 0. mean over the two classes: 0.25 (exact; 0.01 is far below the next AP a change could give)
    assert details["ap_per_class"] == {"circle": pytest.approx(0.5, abs=0.01), "square": 0.0}
    assert total == pytest.approx(0.25, abs=0.01)
    # a single-class collapse (what other tools do) would call this perfect:
    collapsed = [[json.dumps({"size": [100, 100], "labels": ["x"], "boxes": box})] for box in (A, B)]
    assert get_metric("coco_map").compute([_pred(["x"], A), _pred(["x"], B)], collapsed)[1] == pytest.approx(1.0)


def test_map_one_images_error_moves_the_whole_set_score() -> None:
    refs = [_ref(["square"], A) for _ in range(4)]
    good = [_pred(["square"], A) for _ in range(4)]
    one_missed = good[:3] + ["<s></s>"]
    total = get_metric("coco_map").compute(one_missed, refs)[1]
    # 4 true squares, 3 found with precision 1: COCO's 101-point AP = recall 0.75 -> 76/101 points at precision 1
    assert total == pytest.approx(76 / 101, abs=1e-4)
    assert get_metric("map_50").compute(one_missed, refs)[1] == pytest.approx(76 / 101, abs=1e-4)
    # a per-batch mean (batches of 2) would give (1 + 76/101... ) -- the whole-set value is what we report:
    assert get_metric("coco_map").compute(good, refs)[1] == pytest.approx(1.0)


def test_map_does_not_depend_on_the_order_of_the_images() -> None:
    refs = [_ref(["square"], A), _ref(["square"], A)]
    preds = [_pred(["square"], A), _pred(["square"], B)]  # one hit, one miss: precision 1/2 at recall 1/2
    forward = get_metric("coco_map").compute(preds, refs)[1]
    backward = get_metric("coco_map").compute(preds[::-1], refs[::-1])[1]
    # pycocotools' accumulate walks tied scores in image order: 51/101 forward, half that backward
    assert forward == pytest.approx(0.5 * 51 / 101, abs=1e-9) and backward == pytest.approx(forward, abs=1e-9)


def test_tied_precision_equals_pycocotools_when_scores_differ() -> None:
    np = pytest.importorskip("numpy")
    pytest.importorskip("pycocotools")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from florence_kit.metrics.region_scores import tied_precision

    rng, compared = random.Random(0), 0
    for _ in range(8):
        anns, dets = [], []
        for i in range(4):
            for _ in range(rng.randint(0, 3)):
                x, y, w, h = (rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(5, 40), rng.uniform(5, 40))
                c = rng.randint(1, 3)
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
                for _ in range(rng.randint(0, 2)):  # none, one, or duplicates, sometimes of the wrong class
                    dets.append({"image_id": i, "category_id": c if rng.random() < 0.8 else rng.randint(1, 3),
                                 "bbox": [x + rng.uniform(-6, 6), y + rng.uniform(-6, 6), w, h], "score": rng.random()})
        if not dets:  # loadRes refuses an empty list; _coco_eval answers that case before pycocotools
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": [{"id": i, "width": 100, "height": 100} for i in range(4)], "annotations": anns,
                          "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
            gt.createIndex()
            evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
            evaluator.evaluate()
            ours = tied_precision(evaluator)
            evaluator.accumulate()
        assert np.array_equal(ours, evaluator.eval["precision"][:, :, :, 0, -1])
        compared += 1
    assert compared >= 6


def test_non_ascii_class_names_are_scored() -> None:
    labels = ["café", "信号灯"]
    refs, preds = [_ref(labels, A + B)], [_pred(labels, A + B)]
    _, total, details = get_metric("coco_map").compute_with_details(preds, refs)
    assert total == pytest.approx(1.0) and details["unknown_labels"] == 0
    assert get_metric("grounding_recall").compute(preds, refs)[1] == pytest.approx(1.0)
    assert parse_boxes(preds[0], (100, 100))["labels"] == ["caf", ""]  # the processor's own reading, kept for predict


def test_map_counts_generated_names_outside_the_label_set() -> None:
    refs = [_ref(["square"], A), _ref(["square"], B)]
    preds = [_pred(["square", "sqaure"], A + B), _pred(["sqaure"], B)]
    _, total, details = get_metric("coco_map").compute_with_details(preds, refs)
    assert details["unknown_labels"] == 2 and details["unknown_label_names"] == {"sqaure": 2}
    assert total == pytest.approx(51 / 101, abs=1e-4)  # one of two squares found, precision 1


def test_grounding_region_and_ocr_metrics_on_hand_made_predictions() -> None:
    refs = [_ref(["a red square", "a circle"], A + B)]
    assert get_metric("grounding_recall").compute([_pred(["a red square", "a circle"], A + B)], refs)[1] == 1.0
    assert get_metric("grounding_recall").compute([_pred(["a red square", "a circle"], A + A)], refs)[1] == 0.5
    assert get_metric("region_recall").compute([_pred(["x"], B)], refs)[1] == 0.5
    quads = [[10, 10, 40, 10, 40, 40, 10, 40], [50, 50, 90, 50, 90, 90, 50, 90]]
    ocr_ref = [[json.dumps({"size": [100, 100], "labels": ["cat", "dog"], "quads": quads})]]
    text = _pred(["cat", "dig"], quads)
    assert get_metric("ocr_region_cer").compute([text], ocr_ref)[1] == pytest.approx(1 / 7)
    assert get_metric("ocr_region_wer").compute([text], ocr_ref)[1] == pytest.approx(1 / 2)
    assert get_metric("ocr_box_recall").compute([_pred(["cat"], quads[:1])], ocr_ref)[1] == 0.5
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Data


def _examples(ds, task_name: str = "od") -> list:
    task = get_task(task_name)
    data = TaskDataset(ds, task, with_target=True)
    return [data[i] for i in range(len(data))]


def test_coco_and_yolo_folders_load_to_the_same_examples(coco_dir: Path, yolo_dir: Path, scenes: dict,
                                                         tmp_path: Path) -> None:
    coco, yolo = load_source(str(coco_dir)), load_source(str(yolo_dir))
    assert set(coco) == set(yolo) == {"train", "validation"}
    hub = hub_splits(scenes)
    for split in ("train", "validation"):
        from_coco, from_yolo, from_hub = (_examples(d[split]) for d in (coco, yolo, hub))
        assert len(from_coco) == len(from_yolo) == len(scenes[split])
        for c, y, h in zip(from_coco, from_yolo, from_hub, strict=True):
            assert c.target == y.target == h.target and c.prompt == y.prompt == "<OD>"
            rc, ry = json.loads(c.references[0]), json.loads(y.references[0])
            assert rc["labels"] == ry["labels"] and rc["size"] == ry["size"] == [128, 128]
            # YOLO files hold fractions to 6 decimals: <= 5e-7 x 128 px per number, ~1e-4 px per corner
            assert _flat(rc["boxes"]) == pytest.approx(_flat(ry["boxes"]), abs=1e-3)
    first = _examples(coco["train"])
    texts = TaskDataset(coco["train"], get_task("od"), with_target=True).texts()  # the length preflight: no images
    assert [target for _, _, target in texts] == [e.target for e in first]
    assert first[0].target == "" and json.loads(first[0].references[0])["labels"] == []  # the empty image is kept
    assert any("traffic-light<loc_" in e.target or "class 2<loc_" in e.target for e in first)
    # classes.txt instead of data.yaml gives the same
    alt = write_yolo(scenes, tmp_path / "yolo2", names_file="classes.txt")
    assert [e.target for e in _examples(load_source(str(alt))["train"])] == [e.target for e in first]


def test_bad_boxes_are_clipped_or_dropped_and_counted() -> None:
    regions = get_task("od").regions
    from PIL import Image

    row = {"image": Image.new("RGB", (100, 50)), "objects": {
        "bbox": [[-10, -5, 30, 20], [90, 40, 30, 30], [10, 10, -5, 4], [200, 200, 5, 5], [1, 2, 3], [5, 5, 10, 10]],
        "category": [0, 1, 0, 1, 0, 7]}}
    counts = RegionCounts()
    with pytest.warns(UserWarning, match="bad boxes in the data"):
        fields = region_fields(regions, row, "image", ["a", "b"], counts)
    ref = json.loads(fields["references"][0])
    assert ref["boxes"] == [[0, 0, 20, 15], [90, 40, 100, 50]] and ref["labels"] == ["a", "b"]
    assert (counts.boxes, counts.clipped, counts.dropped, counts.unknown_class) == (6, 2, 4, 1)


def test_boxes_without_a_class_are_dropped_and_counted() -> None:
    """Unpaired lists used to lose their extra boxes uncounted, and a null class became the label 'None'."""
    from PIL import Image

    regions, image = get_task("od").regions, Image.new("RGB", (100, 50))
    counts = RegionCounts()
    objects = {"bbox": [[1, 2, 3, 4], [5, 5, 10, 10], [20, 20, 5, 5]], "category": ["a"]}
    with pytest.warns(UserWarning, match="bad boxes in the data"):
        fields = region_fields(regions, {"image": image, "objects": objects}, "image", None, counts)
    assert json.loads(fields["references"][0])["labels"] == ["a"]
    assert (counts.boxes, counts.dropped) == (3, 2)
    counts = RegionCounts()
    objects = [{"bbox": [1, 2, 3, 4], "category": None}, {"bbox": [5, 5, 10, 10], "category": " "},
               {"bbox": [20, 20, 5, 5], "category": "b"}]
    with pytest.warns(UserWarning, match="bad boxes in the data"):
        fields = region_fields(regions, {"image": image, "objects": objects}, "image", None, counts)
    assert "None" not in fields["target"] and json.loads(fields["references"][0])["labels"] == ["b"]
    assert (counts.boxes, counts.dropped) == (3, 2)


def test_finetune_and_eval_print_the_bad_box_counts_once(tiny_dir: Path, tmp_path: Path) -> None:
    """The warning said bad boxes were "counted" but no count was ever shown; finetune and eval now print one line
    with each kind, counted over one pass through the data (the preflight's; training reads the rows again)."""
    from PIL import Image

    image = Image.new("RGB", (100, 50), "white")
    objects = [{"bbox": [[80, 10, 40, 20], [5, 5, 10, 10]], "category": ["a", "b"]},  # the first is clipped
               {"bbox": [[5, 5, 0, 10]], "category": ["a"]},  # no area
               {"bbox": [[5, 5, 10, 10]], "category": [None]},  # no class
               {"bbox": [[5, 5, 10, 10]], "category": ["b"]}]
    rows = datasets.Dataset.from_dict({"image": [image] * 4, "width": [100] * 4, "height": [50] * 4,
                                       "objects": objects})
    examples = TaskDataset(rows, get_task("od"), with_target=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # the preflight, then --fit auto or --prepare-data read the texts again
            list(examples.texts())
    assert (examples.region_counts.boxes, examples.region_counts.dropped) == (5, 2)
    data = tmp_path / "data"
    datasets.DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(data))
    want = ("bad boxes in the data: 5 boxes: 1 clipped to the image, 2 dropped (1 with no area, 1 without a class, "
            "0 with a class id outside the label names)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = runner.invoke(app, ["finetune", "od", "--model", str(tiny_dir), "--dataset", str(data),
                                     "--output-dir", str(tmp_path / "ft"), "--max-steps", "4", "--batch-size", "2",
                                     "--quiet"])
        assert result.exit_code == 0, result.output
        assert "".join(result.output.split()).count("".join(want.split())) == 1, result.output
        result = runner.invoke(app, ["eval", "od", "--model", str(tmp_path / "ft"), "--dataset", str(data),
                                     "--output-dir", str(tmp_path / "ev"), "--quiet", "--max-new-tokens", "4",
                                     "--split", "validation"])
        assert result.exit_code == 0, result.output
        assert "".join(result.output.split()).count("".join(want.split())) == 1, result.output


def test_class_ids_without_names_warn_once() -> None:
    from PIL import Image

    regions, image = get_task("od").regions, Image.new("RGB", (100, 50))
    row = {"image": image, "objects": {"bbox": [[1, 2, 3, 4], [5, 5, 10, 10]], "category": [0, 1]}}
    counts = RegionCounts()
    with pytest.warns(UserWarning, match="class ids without class names") as record:
        fields = region_fields(regions, row, "image", None, counts)
        region_fields(regions, row, "image", None, counts)
    assert fields["target"].startswith("0<loc_") and len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the names: no warning
        assert region_fields(regions, row, "image", ["cat", "dog"], RegionCounts())["target"].startswith("cat")


def test_objects_without_the_box_or_class_key_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    from florence_kit.common.errors import UserError

    regions, image = get_task("od").regions, Image.new("RGB", (100, 50))
    for objects in ({"boxes": [[1, 2, 3, 4]], "label": ["cat"]}, [{"bbox": [1, 2, 3, 4], "label": "cat"}]):
        with pytest.raises(UserError, match="column 'objects' has no 'category'|has no 'bbox' or 'category'"):
            region_fields(regions, {"image": image, "objects": objects}, "image", None, RegionCounts())
    empty = region_fields(regions, {"image": image, "objects": {"bbox": [], "category": []}}, "image", None,
                          RegionCounts())
    assert empty["target"] == ""  # an image without boxes is still fine
    data = tmp_path / "d"
    data.mkdir()
    image.save(data / "a.png")
    (data / "test.jsonl").write_text(json.dumps({"image": "a.png", "objects": {"boxes": [[1, 2, 3, 4]],
                                                                                "label": ["cat"]}}) + "\n")
    result = runner.invoke(app, ["eval", "od", "--dataset", str(data), "--model", str(tiny_dir),
                                 "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "has no 'bbox' or 'category' (its keys: boxes, label)" in result.output


def test_coco_images_without_width_and_height_are_measured(coco_dir: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "no_sizes"
    shutil.copytree(coco_dir, root)
    for path in root.rglob("*.json"):
        data = json.loads(path.read_text())
        for image in data["images"]:
            image.pop("width", None)
            image.pop("height", None)
        path.write_text(json.dumps(data))
    full, bare = load_source(str(coco_dir))["train"], load_source(str(root))["train"]
    assert bare["width"] == full["width"] and bare["height"] == full["height"]
    texts = TaskDataset(bare, get_task("od"), with_target=True).texts()  # the length preflight reads no image
    assert [t for _, _, t in texts] == [t for _, _, t in TaskDataset(full, get_task("od"), with_target=True).texts()]


def test_yolo_fractions_are_of_the_upright_image(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "phone"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    image = Image.new("RGB", (200, 100), "white")  # stored 200 x 100 with orientation 6: shown 100 wide, 200 high
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(root / "images" / "train" / "a.jpg", exif=exif)
    (root / "labels" / "train" / "a.txt").write_text("0 0.25 0.25 0.1 0.1\n")  # as Ultralytics reads it: upright
    (root / "classes.txt").write_text("cat\n")
    data = TaskDataset(load_source(str(root))["train"], get_task("od"), with_target=True)
    example = data[0]
    assert example.image.size == (100, 200)  # datasets turns it upright
    assert json.loads(example.references[0])["boxes"] == [[20, 40, 30, 60]]
    assert example.target == "cat<loc_200><loc_200><loc_300><loc_300>"
    assert [t for _, _, t in data.texts()] == [example.target]  # the length preflight agrees


def test_yolo_and_coco_bad_lines_do_not_crash(tmp_path: Path, scenes: dict) -> None:
    root = write_yolo({"train": scenes["train"][:3]}, tmp_path / "y")
    label = next((root / "labels" / "train").glob("*_001.txt"))
    label.write_text(label.read_text() + "9 0.5 0.5 0.1 0.1\nnot a line\n0 0.5 0.5 -0.2 0.1\n")
    with pytest.warns(UserWarning, match="2 label line"):
        ds = load_source(str(root))["train"]
    data = TaskDataset(ds, get_task("od"), with_target=True)
    with pytest.warns(UserWarning, match="bad boxes"):
        _ = [data[i] for i in range(len(data))]
    assert data.region_counts.dropped == 1  # the negative-width box


def test_tasks_show_od_prints_a_loc_target(coco_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["tasks", "show", "od", "--dataset", str(coco_dir)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert "example target: ''" in result.stdout  # row 0 is the empty image
    assert "regions: kind=od box_format=xywh objects=objects bbox=bbox category=category" in result.stdout
    scenes = shape_scenes(3, seed=5)[1:]
    one = hub_splits({"train": scenes})
    one.save_to_disk(str(tmp_path / "one"))
    result = runner.invoke(app, ["tasks", "show", "od", "--dataset", str(tmp_path / "one")], terminal_width=300)
    want = encode_regions(scenes[0].labels, [[x, y, x + w, y + h] for x, y, w, h in scenes[0].boxes], (128, 128))
    flat = "".join(result.stdout.split())  # rich wraps long lines at spaces ("class 2")
    assert "".join(f"example target: {want!r}".split()) in flat and "<loc_" in want
    result = runner.invoke(app, ["tasks", "show", "grounding", "--dataset", str(coco_dir)], terminal_width=300)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# The four tasks train and evaluate


def _run(task: str, tiny_dir: Path, data: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    result = runner.invoke(app, ["finetune", task, "--model", str(tiny_dir), "--dataset", str(data),
                                 "--output-dir", str(tmp_path / "ft"), *TRAIN])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", task, "--model", str(tmp_path / "ft"), "--dataset", str(data),
                                 "--output-dir", str(tmp_path / "ev"), "--quiet", "--max-new-tokens", "12",
                                 "--split", "validation"])
    assert result.exit_code == 0, result.output
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    return json.loads((tmp_path / "ev" / "metrics.json").read_text()), preds


def test_od_trains_and_evaluates_from_a_coco_folder(tiny_dir: Path, coco_dir: Path, tmp_path: Path) -> None:
    metrics, preds = _run("od", tiny_dir, coco_dir, tmp_path)
    assert metrics["metric"] == "coco_map" and metrics["n_scored"] == 4 == len(preds)
    assert 0.0 <= metrics["coco_map"] <= 1.0 and "map_50" in metrics
    details = metrics["coco_map_details"]
    assert {"map", "map_50", "ap_per_class", "unknown_labels"} <= set(details)
    rescored = runner.invoke(app, ["score", "od", str(tmp_path / "ev" / "predictions.jsonl"), "--json"])
    assert rescored.exit_code == 0, rescored.output
    assert json.loads(rescored.stdout)["coco_map"] == pytest.approx(metrics["coco_map"])
    truth = [p["references"] for p in preds]
    perfect = [encode_regions(json.loads(r[0])["labels"], json.loads(r[0])["boxes"], json.loads(r[0])["size"])
               for r in truth]
    assert get_metric("coco_map").compute(perfect, truth)[1] == pytest.approx(1.0)  # the references round trip


@pytest.mark.parametrize("task", ["grounding", "region-caption", "ocr-region"])
def test_other_region_tasks_train_and_evaluate(task: str, tiny_dir: Path, tmp_path: Path) -> None:
    if task == "ocr-region":
        ds = hub_splits({"train": text_scenes(8, 0), "validation": text_scenes(4, 1)}, text=True)
    else:
        ds = hub_splits({"train": shape_scenes(8, 0), "validation": shape_scenes(4, 1)})
    data = tmp_path / "data"
    ds.save_to_disk(str(data))
    metrics, preds = _run(task, tiny_dir, data, tmp_path)
    spec = get_task(task)
    assert metrics["metric"] == spec.metric and metrics["n_scored"] == 4
    assert all(metrics[m] is not None for m in spec.metrics)
    first = TaskDataset(load_split(spec, str(data), "validation"), spec, with_target=True)[1]
    assert "<loc_" in first.target and first.prompt.startswith(spec.prompt.split("{")[0])
    if task == "grounding":
        assert first.prompt == "<CAPTION_TO_PHRASE_GROUNDING>" + ds["validation"][1]["caption"]


def test_hub_layout_with_xyxy_boxes_needs_the_box_format(scenes: dict) -> None:
    ds = hub_splits(scenes)["train"]
    xyxy = ds.map(lambda r: {"objects": {"bbox": [[x, y, x + w, y + h] for x, y, w, h in r["objects"]["bbox"]],
                                         "category": r["objects"]["category"]}}, features=ds.features)
    task = get_task("od")
    as_xyxy = task.__class__(**{**task.__dict__, "regions": {**task.regions, "box_format": "xyxy"}})
    assert [e.target for e in _examples(ds)] == [TaskDataset(xyxy, as_xyxy, with_target=True)[i].target
                                                 for i in range(len(xyxy))]
    assert isinstance(ds.features["objects"]["category"].feature, datasets.ClassLabel)


# ---------------------------------------------------------------------------------------------
# Seeing it


def test_answer_is_parsed_and_drawn_into_a_png(processor, tmp_path: Path) -> None:
    from PIL import Image

    from florence_kit.evaluate.region_answers import parse_answer, png_path
    from florence_kit.present.draw import draw_answer

    spec = get_task("od")
    image = Image.new("RGB", (128, 128), "white")
    text = encode_regions(["traffic-light"], [[20, 30, 90, 100]], image.size)
    parsed = parse_answer(spec, processor, text, image.size)
    assert parsed["labels"] == ["traffic-light"] and parsed["bboxes"] == [[20, 30, 90, 100]]
    out = draw_answer(image, parsed, png_path(tmp_path / "page.png", spec))
    assert out == tmp_path / "page.od.png"
    drawn = Image.open(out).convert("RGB")
    assert drawn.getpixel((55, 100)) != (255, 255, 255) and drawn.getpixel((55, 65)) == (255, 255, 255)
    assert draw_answer(image, parse_answer(spec, processor, "nothing", image.size), tmp_path / "x.png") is None


def test_predict_on_a_region_task_prints_json_and_says_what_it_drew(tiny_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    shape_scenes(2, seed=3)[1].image.save(page)
    result = runner.invoke(app, ["predict", str(page), "--task", "od", "--model", str(tiny_dir)])
    assert result.exit_code == 0, result.output
    first, second = result.stdout.strip().splitlines()[-2:]
    parsed = json.loads(first)
    assert set(parsed) == {"bboxes", "labels"}
    if parsed["bboxes"]:
        assert second == f"regions drawn: {tmp_path / 'page.od.png'}" and (tmp_path / "page.od.png").is_file()
    else:
        assert second.startswith("no regions") and not (tmp_path / "page.od.png").exists()


def test_box_format_flag(scenes: dict, tmp_path: Path) -> None:
    from florence_kit.tasks.region_block import with_box_format
    from florence_kit.train.config import TrainConfig

    assert with_box_format(get_task("od"), "xyxy").regions["box_format"] == "xyxy"
    assert with_box_format(get_task("od"), None) == get_task("od")
    result = runner.invoke(app, ["eval", "caption", "--box-format", "xyxy", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "applies to region tasks" in result.output
    assert TrainConfig(task="od", model="m", output_dir=tmp_path, box_format="xyxyn").box_format == "xyxyn"


def test_report_thumbnails_show_true_and_predicted_boxes(tmp_path: Path) -> None:
    import base64
    import io
    import re

    from PIL import Image

    from florence_kit.evaluate.scoring import EvalResult, thumbnail_jpeg, write_results
    from florence_kit.present.draw import overlay_thumbnail
    from florence_kit.present.report import write_report

    image = Image.new("RGB", (512, 512), "white")
    ref = json.dumps({"size": [512, 512], "labels": ["circle"], "boxes": [[40, 40, 200, 200]]})
    prediction = encode_regions(["square"], [[300, 300, 480, 480]], (512, 512))
    rec = {"id": "0", "prompt": "<OD>", "prediction": prediction, "references": [ref]}
    thumb = Image.open(io.BytesIO(overlay_thumbnail(thumbnail_jpeg(image, 256), rec)))  # half size
    green, red = thumb.getpixel((60, 20)), thumb.getpixel((200, 150))  # on the true / predicted box's edge
    assert green[1] > 120 and green[0] < 120 and red[0] > 150 and red[1] < 120
    assert overlay_thumbnail(thumbnail_jpeg(image), {"references": ["a caption"], "prediction": "x"}) is None
    write_results(EvalResult({"metric": "coco_map", "coco_map": 0.0, "n": 1, "n_scored": 1}, [rec],
                             [thumbnail_jpeg(image, 256)]), tmp_path / "ev")
    html = write_report(tmp_path / "ev").read_text()
    shown = re.search(r'data:image/jpeg;base64,([^"]+)"', html).group(1)
    assert Image.open(io.BytesIO(base64.b64decode(shown))).getpixel((200, 150))[0] > 150


def test_location_tokens_survive_decoding_where_the_tokenizer_calls_them_special(tiny_dir: Path) -> None:
    from transformers import AutoProcessor

    from florence_kit.common.geometry import decode_answers
    from florence_kit.model.tiny import LOC_TOKENS

    proc = AutoProcessor.from_pretrained(str(tiny_dir))
    text = "traffic-light<loc_1><loc_20><loc_300><loc_999>"
    ids = [proc.tokenizer.bos_token_id, *proc.tokenizer(text, add_special_tokens=False)["input_ids"],
           proc.tokenizer.eos_token_id, proc.tokenizer.pad_token_id]
    assert decode_answers(proc, [ids]) == [text]
    proc.tokenizer.add_special_tokens({"additional_special_tokens": LOC_TOKENS})  # as Microsoft's tokenizer has them
    assert proc.batch_decode([ids], skip_special_tokens=True) == ["traffic-light"]  # what would lose every box
    assert decode_answers(proc, [ids]) == [text]
