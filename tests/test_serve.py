"""``florence-kit serve``: region drawing, prompts, and the live page through gradio_client and headless Chromium."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app
from florence_kit.common.errors import UserError
from florence_kit.present.draw import draw_regions
from florence_kit.present.serve import Predictor

runner = CliRunner()
WHITE = (255, 255, 255)


def test_draw_regions_on_hand_made_post_processed_results() -> None:
    page = Image.new("RGB", (200, 100), WHITE)
    # the shapes of processor.post_process_generation(...)[task] for <OD>, <OCR_WITH_REGION> and segmentation
    boxes = draw_regions(page, {"bboxes": [[10.0, 20.0, 60.0, 80.0]], "labels": ["total"]})
    assert boxes is not None and boxes.size == page.size and page.getpixel((10, 50)) == WHITE  # a copy
    assert boxes.getpixel((10, 50)) != WHITE and boxes.getpixel((60, 50)) != WHITE  # left and right edges
    assert boxes.getpixel((35, 60)) == WHITE  # inside is left clear
    assert boxes.getpixel((11, 21)) != WHITE  # the label tag at the top-left corner

    quads = draw_regions(page, {"quad_boxes": [[100, 10, 190, 10, 190, 40, 100, 40]], "labels": [""]})
    assert quads.getpixel((150, 10)) != WHITE and quads.getpixel((150, 25)) == WHITE

    polys = draw_regions(page, {"polygons": [[[120, 50, 180, 50, 150, 95]]], "labels": ["cell"]})
    inside = polys.getpixel((150, 70))  # masks are filled translucently, outlines drawn on top
    assert polys.getpixel((150, 50)) != WHITE and inside != WHITE and min(inside) > 150

    mixed = {"bboxes": [[0, 0, 5, 5]], "bboxes_labels": ["a"], "polygons": [], "polygons_labels": []}
    assert draw_regions(page, mixed) is not None  # <OPEN_VOCABULARY_DETECTION>'s keys
    assert draw_regions(page, {"bboxes": [], "labels": []}) is None
    assert draw_regions(page, "a caption") is None


def test_prompts_for_our_tasks_and_florence_tokens(docvqa_task) -> None:
    processor = SimpleNamespace(tasks_answer_post_processing_type={"<OD>": "description_with_bboxes"})
    predictor = Predictor(None, processor, {"docvqa": docvqa_task})
    assert predictor.prompt_for("docvqa", " What is the total? ")[0] == "<DocVQA>What is the total?"
    assert predictor.prompt_for("<OD>", "ignored")[0] == "<OD>"
    assert predictor.prompt_for("<OPEN_VOCABULARY_DETECTION>", "a stamp")[0] == "<OPEN_VOCABULARY_DETECTION>a stamp"
    assert predictor.choices()[0] == "docvqa" and "<OCR_WITH_REGION>" in predictor.choices()
    with pytest.raises(UserError, match="needs a question"):
        predictor.prompt_for("docvqa", "")
    with pytest.raises(UserError, match="unknown task 'nope'"):
        predictor.prompt_for("nope", "x")


@pytest.fixture(scope="module")
def page_png(docvqa_splits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "page.png"
    docvqa_splits["validation"][0]["image"].save(path)
    return path


def test_predictor_answers_text_and_region_tasks_on_the_tiny_model(tiny_dir: Path, page_png: Path,
                                                                  docvqa_task) -> None:
    from florence_kit.model.loading import load_model

    model, processor = load_model(str(tiny_dir))
    predictor = Predictor(model, processor, {"docvqa": docvqa_task}, region_max_tokens=12)
    image = Image.open(page_png)
    answer = predictor(image, "docvqa", "What is the total?")
    assert isinstance(answer.text, str) and answer.regions is None
    regions = predictor(image, "<OD>", "")
    assert set(json.loads(regions.text)) == {"bboxes", "labels"}  # parsed by post_process_generation
    with pytest.raises(UserError, match="upload an image"):
        predictor(None, "docvqa", "What is the total?")


def test_serve_without_gradio_names_the_extra(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio → ImportError
    result = runner.invoke(app, ["serve", str(tiny_dir)])
    assert result.exit_code == 2 and "pip install 'florence-kit[ui]'" in result.output


def test_serve_with_an_unknown_task_exits_2_before_loading(tiny_dir: Path) -> None:
    result = runner.invoke(app, ["serve", str(tiny_dir / "nowhere"), "--task", "docvqq"])
    assert result.exit_code == 2 and "docvqa" in result.output  # did you mean


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"serve did not answer on {url} within {timeout}s")


def test_serve_page_answers_through_gradio_client_and_in_chromium(tiny_dir: Path, page_png: Path,
                                                                  tmp_path: Path) -> None:
    from browser import assert_not_blank, open_page, require_browser

    pytest.importorskip("gradio", reason="gradio not installed (pip install -e '.[ui]')")
    gradio_client = pytest.importorskip("gradio_client")
    require_browser()
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from florence_kit.cli import main; main()", "serve", str(tiny_dir),
         "--task", "docvqa", "--port", str(port), "--host", "127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_until_up(url, proc)
        client = gradio_client.Client(url, verbose=False)
        text, regions = client.predict(gradio_client.handle_file(str(page_png)), "docvqa", "What is the total?",
                                       api_name="/predict")
        assert isinstance(text, str) and regions is None
        assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/predict"]
        with pytest.raises(Exception, match="needs a question"):  # a UserError reaches the page as gr.Error
            client.predict(gradio_client.handle_file(str(page_png)), "docvqa", "", api_name="/predict")

        with open_page(url) as (page, log):
            page.get_by_text("Answer", exact=True).wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(page_png))
            page.get_by_label("question").fill("What is the total?")
            page.get_by_role("button", name="Answer").click()
            answer_box = page.get_by_label("answer")
            page.wait_for_function("el => el.value !== ''", arg=answer_box.element_handle(), timeout=60_000)
            assert answer_box.input_value() == text  # greedy decoding: the page and the API agree
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
            assert_not_blank(shot)
            # The one failure filtered out: Gradio's frontend aborts its own event stream (queue/data) once the
            # job is done, which Chromium reports as ERR_ABORTED. Every console error and other failed request counts.
            failed = [r for r in log.failed_requests if not ("/gradio_api/queue/data" in r and "ERR_ABORTED" in r)]
            assert log.errors == [] and failed == [], log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_page_answers_as_predict_does_for_text_and_custom_region_tasks(tiny_dir: Path, page_png: Path,
                                                                            docvqa_task) -> None:
    """Same decoding as `predict`/`eval`: a region task of the user's own prompt gets its boxes parsed too."""
    from dataclasses import replace

    from florence_kit.evaluate.generation import generate, generation_config_for
    from florence_kit.evaluate.region_answers import generate_raw, parse_answer
    from florence_kit.model.loading import load_model
    from florence_kit.tasks.registry import get_task

    model, processor = load_model(str(tiny_dir))
    shapes = replace(get_task("od"), name="shapes", prompt="find the shapes")  # not a Florence-2 task token
    predictor = Predictor(model, processor, {"docvqa": docvqa_task, "shapes": shapes})
    image = Image.open(page_png).convert("RGB")
    expected = generate(model, processor, [image], ["<DocVQA>What is the total?"],
                        generation_config_for(docvqa_task, model, processor))[0]
    assert predictor(image, "docvqa", "What is the total?").text == expected
    raw = generate_raw(model, processor, image, "find the shapes", generation_config_for(shapes, model, processor))
    answer = predictor(image, "shapes", "")
    assert json.loads(answer.text) == json.loads(json.dumps(parse_answer(shapes, processor, raw, image.size)))
    assert set(json.loads(answer.text)) == {"bboxes", "labels"}
