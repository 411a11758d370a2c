"""``serve --api``: the real ``openai`` client against a server on 127.0.0.1, answers equal to ``predict``'s,
streaming, refusals (4xx, the server keeps answering), the API key, batching, and a draining shutdown."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from florence_kit.cli import app as cli_app

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
runner = CliRunner()
TOKENS = 10  # answer length in the tests: the tiny random model runs every answer to the cap


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    """A uvicorn server in a thread of the test process (the model loads once for the module)."""

    def __init__(self, asgi: Any, grace_s: float = 30.0) -> None:
        from florence_kit.present.api import make_server

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(asgi, "127.0.0.1", self.port, grace_s)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the API server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def engine(tiny_dir: Path, one_thread):
    from florence_kit.model.loading import load_model
    from florence_kit.present.api import ApiSettings, Engine
    from florence_kit.tasks.registry import all_tasks

    model, processor = load_model(str(tiny_dir))
    settings = ApiSettings(model_name="tiny", default_task="docvqa", batch_window_ms=100, max_batch=8,
                           max_body_mb=1, max_image_pixels=1_000_000)
    engine = Engine(model, processor, dict(all_tasks([])), settings)
    yield engine
    engine.batcher.stop()


@pytest.fixture(scope="module")
def server(engine):
    from florence_kit.present.api import build_app

    running = Running(build_app(engine))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pages(docvqa_splits, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("api")
    paths = []
    for i in range(3):
        path = folder / f"page{i}.png"
        docvqa_splits["validation"][i]["image"].save(path)
        paths.append(path)
    return paths


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def ask(client: Any, url: str, text: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=extra.pop("max_tokens", TOKENS), extra_body=extra or None,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": text}]}])


def post(url: str, body: Any, headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def predict_records(tiny_dir: Path, page: Path, tmp_path: Path, task: str, question: str | None = None) -> dict:
    out = tmp_path / f"{task}.jsonl"
    args = ["predict", str(page), "--task", task, "--model", str(tiny_dir), "--output", str(out),
            "--max-new-tokens", str(TOKENS), "--quiet"]
    result = runner.invoke(cli_app, args + (["--question", question] if question else []))
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    return record


def test_openai_client_gets_predicts_answers_caption_od_docvqa(client, server, tiny_dir: Path, pages: list[Path],
                                                               tmp_path: Path) -> None:
    url = data_url(pages[0])
    caption = ask(client, url, "<CAPTION>")
    od = ask(client, url, "<OD>")
    docvqa = ask(client, url, "What is the total?")  # a bare question goes to the default task
    by_name = ask(client, url, "docvqa", question="What is the total?")
    expected = {name: predict_records(tiny_dir, pages[0], tmp_path, name, q)
                for name, q in (("caption", None), ("od", None), ("docvqa", "What is the total?"))}

    assert caption.choices[0].message.content == expected["caption"]["text"]
    assert docvqa.choices[0].message.content == expected["docvqa"]["text"] == by_name.choices[0].message.content
    florence = od.model_extra["florence"]
    assert florence["task"] == "od" and florence["text"] == expected["od"]["text"]
    assert florence["answer"] == expected["od"]["answer"] and set(florence["answer"]) == {"bboxes", "labels"}
    assert json.loads(od.choices[0].message.content) == expected["od"]["answer"]  # regions parsed, in pixels
    assert (florence["width"], florence["height"]) == Image.open(pages[0]).size
    assert od.usage.completion_tokens > 0 and od.usage.prompt_tokens > 0
    assert od.usage.total_tokens == od.usage.prompt_tokens + od.usage.completion_tokens
    assert caption.choices[0].finish_reason == "length"  # the random model runs to max_tokens

    # the task-native call answers with predict --output's record
    status, record = post(f"{server.url}/v1/florence/predict", {"image": url, "task": "docvqa",
                                                                "question": "What is the total?",
                                                                "max_new_tokens": TOKENS})
    assert status == 200
    local = {k: v for k, v in expected["docvqa"].items() if k not in ("key", "path", "model")}
    assert {k: v for k, v in record.items() if k not in ("key", "path", "model")} == local
    assert set(record) == set(expected["docvqa"]) and record["key"].startswith("sha256:")

    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny"] and "od" in listed[0].model_extra["florence"]["tasks"]


def test_streaming_sends_token_deltas_that_join_to_the_answer(client, pages: list[Path]) -> None:
    url = data_url(pages[1])
    whole = ask(client, url, "<OD>").choices[0].message.content
    stream = client.chat.completions.create(
        model="tiny", max_tokens=TOKENS, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "<OD>"}]}])
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(deltas) == whole and len(deltas) > 3 and finish == "length"
    assert usage is not None and usage.completion_tokens > 0


def _gif(path: Path) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), "white").save(buffer, "GIF")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"  # claims PNG, holds a GIF


def _png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, "PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_bad_requests_get_4xx_in_openai_shape_and_the_server_keeps_answering(server, client,
                                                                             pages: list[Path]) -> None:
    url = data_url(pages[0])
    chat = f"{server.url}/v1/chat/completions"

    def message(image: str | None, text: str | None) -> list[dict[str, Any]]:
        parts = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + (
            [{"type": "text", "text": text}] if text else [])
        return [{"role": "user", "content": parts}]

    cases = [  # (what, body, status, code)
        ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
        ("not an object", b"[1, 2]", 400, "invalid_json"),
        ("no messages", {"model": "tiny"}, 400, "missing_messages"),
        ("no image", {"messages": message(None, "<OD>")}, 400, "missing_image"),
        ("no text", {"messages": message(url, None)}, 400, "missing_text"),
        ("unknown task", {"messages": message(url, "<NOT_A_TASK>")}, 400, "unknown_task"),
        ("unknown task by name", {"messages": message(url, "x"), "task": "docvqq"}, 400, "unknown_task"),
        ("box outside the image", {"messages": message(url, "region-category"), "box": "5000,5000,5100,5100"},
         400, "invalid_box"),
        ("box missing", {"messages": message(url, "<REGION_TO_CATEGORY>")}, 400, "invalid_box"),
        ("question missing", {"messages": message(url, "<DocVQA>")}, 400, "missing_question"),
        ("a GIF", {"messages": message(_gif(pages[0]), "<OD>")}, 415, "unsupported_image_type"),
        ("a TIFF type", {"messages": message("data:image/tiff;base64,AAAA", "<OD>")}, 415, "unsupported_image_type"),
        ("bad base64", {"messages": message("data:image/png;base64,@@@", "<OD>")}, 400, "invalid_image"),
        ("not an image", {"messages": message("data:image/png;base64," + base64.b64encode(b"x" * 64).decode(),
                                              "<OD>")}, 400, "invalid_image"),
        ("too many pixels", {"messages": message(_png((1200, 1000)), "<OD>")}, 400, "image_too_large"),
        ("a network URL", {"messages": message("https://example.com/a.png", "<OD>")}, 400, "remote_url_refused"),
        ("a local path", {"messages": message(str(pages[0]), "<OD>")}, 400, "local_files_disabled"),
        ("temperature", {"messages": message(url, "<OD>"), "temperature": 0.7}, 400, "invalid_value"),
        ("max_tokens past the decoder", {"messages": message(url, "<OD>"), "max_tokens": 100_000}, 400,
         "invalid_value"),
        ("body too large", {"messages": message("data:image/png;base64," + "A" * 1_200_000, "<OD>")}, 413,
         "body_too_large"),
    ]
    for what, body, status, code in cases:
        got, answer = post(chat, body)
        assert (got, answer.get("error", {}).get("code")) == (status, code), (what, answer)
        assert "\n" not in answer["error"]["message"] and answer["error"]["type"], what
    got, answer = post(f"{server.url}/v1/florence/predict", {"task": "od"})
    assert (got, answer["error"]["code"]) == (400, "missing_image")
    got, answer = post(f"{server.url}/v1/nowhere", {})
    assert got == 404 and answer["error"]["code"] == "not_found"
    got, answer = post(chat, b"", method="GET")
    assert got == 405 and answer["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError, match="unknown task"):
        ask(client, url, "<NOT_A_TASK>")
    assert ask(client, url, "<OD>").choices[0].message.content  # still answering
    status, health = post(f"{server.url}/health", b"", method="GET")
    assert status == 200 and health["status"] == "ok"


def test_api_key_refuses_others_with_401(engine, pages: list[Path]) -> None:
    import dataclasses

    from florence_kit.present.api import build_app

    running = Running(build_app(engine, dataclasses.replace(engine.settings, api_key="s3cret")))
    try:
        url = data_url(pages[0])
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            ask(wrong, url, "<OD>")
        status, body = post(f"{running.url}/v1/models", b"", method="GET")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert ask(right, url, "<CAPTION>").choices[0].message.content
        assert post(f"{running.url}/health", b"", method="GET")[0] == 200  # probes need no key
    finally:
        running.stop()


def test_requests_arriving_together_are_batched_with_the_answers_of_one_at_a_time(client, engine,
                                                                                  pages: list[Path]) -> None:
    asks = [(data_url(page), text) for page in pages
            for text in ("<CAPTION>", "<OD>", "What is the total?", "What is the date?")]
    alone = [ask(client, url, text).choices[0].message.content for url, text in asks]
    batcher = engine.batcher
    saved = batcher.window, batcher.max_batch, batcher.largest
    batcher.window, batcher.max_batch, batcher.largest = 5.0, len(asks), 0  # the batch closes when all have come
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            together = list(pool.map(lambda a: ask(client, *a).choices[0].message.content, asks))
        assert batcher.largest == len(asks)  # one generate call for all of them, three tasks mixed
    finally:
        batcher.window, batcher.max_batch, batcher.largest = saved[0], saved[1], max(saved[2], batcher.largest)
    assert together == alone


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones_with_503(engine, pages: list[Path]) -> None:
    from florence_kit.present.api import build_app

    asgi = build_app(engine)
    running = Running(asgi)
    url = data_url(pages[2])
    slow = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0, timeout=120)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(ask, slow, url, "<OD>", max_tokens=400)
        deadline = time.monotonic() + 30
        while asgi.state.in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        running.server.handle_exit(signal.SIGTERM, None)
        status, body = post(f"{running.url}/v1/chat/completions", {"messages": []})
        assert status == 503 and body["error"]["code"] == "shutting_down"
        assert in_flight.result().choices[0].message.content  # finished, not cut
    running.thread.join(15)
    assert not running.thread.is_alive()  # stopped once nothing was in flight


def test_serve_api_refuses_bad_options_before_loading(tiny_dir: Path) -> None:
    result = runner.invoke(cli_app, ["serve", str(tiny_dir / "nowhere"), "--api", "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch must be at least 1" in result.output
    result = runner.invoke(cli_app, ["serve", str(tiny_dir / "nowhere"), "--api", "--task", "docvqq"])
    assert result.exit_code == 2 and "docvqa" in result.output  # did you mean


@pytest.mark.slow
def test_serve_api_command_answers_and_stops_cleanly_on_sigterm(tiny_dir: Path, pages: list[Path]) -> None:
    import os
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from florence_kit.cli import main; main()", "serve",
                             str(tiny_dir), "--api", "--port", str(port), "--allow-local-files"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            try:
                if post(f"http://127.0.0.1:{port}/health", b"", method="GET")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert ask(client, str(pages[0]), "<CAPTION>").choices[0].message.content  # a local path, allowed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_load_benchmark_mixes_tasks_and_breaks_one_request_in_k() -> None:
    from benchmarks.api_load import plan

    requests = plan(100, ["data:a", "data:b"], broken_every=25)
    assert sum(r["broken"] for r in requests) == 4 and requests[24]["broken"] and not requests[23]["broken"]
    assert {r["text"] for r in requests if not r["broken"]} >= {"<CAPTION>", "<OD>", "<OCR>", "What is the total?"}


def test_an_onnx_export_answers_through_the_api_as_predict_does(tiny_dir: Path, pages: list[Path], one_thread,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """The API's engine is the batch engine, so an export served in onnxruntime answers as `predict` on it does,
    batched or one at a time."""
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
    pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")
    from florence_kit.model.loading import load_model
    from florence_kit.present.api import ApiSettings, Engine, build_app
    from florence_kit.present.onnx_export import export_onnx
    from florence_kit.tasks.registry import all_tasks

    tmp = tmp_path_factory.mktemp("api_onnx")
    export = tmp / "onnx"
    export_onnx(str(tiny_dir), export, print_fn=lambda *_: None)
    model, processor = load_model(str(export))
    assert getattr(model, "runs_onnx", False)
    settings = ApiSettings(model_name="tiny-onnx", default_task="docvqa", batch_window_ms=200, max_batch=8,
                           max_body_mb=1, max_image_pixels=1_000_000)
    engine = Engine(model, processor, dict(all_tasks([])), settings)
    running = Running(build_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        asked = [(page, task) for page in pages[:2] for task in ("<CAPTION>", "<OD>")]
        with ThreadPoolExecutor(len(asked)) as pool:  # arriving together: one batch
            together = list(pool.map(lambda a: ask(client, data_url(a[0]), a[1]), asked))
        alone = [ask(client, data_url(page), task) for page, task in asked]
    finally:
        running.stop()
        engine.batcher.stop()
    for (page, task), one, many in zip(asked, alone, together, strict=True):
        name = "caption" if task == "<CAPTION>" else "od"
        expected = predict_records(export, page, tmp, name)
        assert one.choices[0].message.content == many.choices[0].message.content
        got = one.model_extra["florence"]["text"] if name == "od" else one.choices[0].message.content
        assert got == expected["text"], (name, page)
