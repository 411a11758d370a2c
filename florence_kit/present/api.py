"""``florence-kit serve MODEL --api``: an OpenAI-compatible HTTP API in front of the batch engine.

Programs already speak OpenAI's chat completions, so ``POST /v1/chat/completions`` takes OpenAI's request shape
(a user message with an ``image_url`` part and a ``text`` part) and answers in OpenAI's shape, plus a ``florence``
field with the parsed regions in pixels. ``POST /v1/florence/predict`` is the task-native call and answers with the
record ``predict --output`` writes (:func:`florence_kit.evaluate.corpus.answer_record`).

Requests that arrive together are answered together: one thread collects what arrives within a short window (or
what queued while the model was busy), up to a maximum batch, and hands it to
:func:`florence_kit.evaluate.batch.answer_requests`, grouped by task and generation settings. Right padding keeps
every answer the one a request alone gets. Images are only ever read from the request (a ``data:`` URL) or, when
allowed, from a local file: the server never fetches a URL. Every refusal is a 4xx in OpenAI's error shape with
a one-line message, and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import io
import json
import queue
import re
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.tasks.spec import TaskSpec, template_fields

TOKEN = re.compile(r"<[A-Za-z_]+>")  # a task token: Florence-2's <OD>, a fine-tune's <DocVQA>
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
DISCARD_BYTES = 256 * 1024 * 1024  # an over-limit body is read and dropped up to this, then the connection closes


def task_token(prompt: str) -> str:
    match = TOKEN.match(prompt)
    return match.group(0) if match else ""


class ApiError(Exception):
    """A refusal: HTTP status, a one-line message, and OpenAI's ``type``/``code``/``param``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ApiSettings:
    """What ``serve --api`` lets a caller do; the defaults are the command's."""

    model_name: str
    default_task: str
    batch_window_ms: float = 10.0
    max_batch: int = 16
    api_key: str | None = None
    allow_local_files: bool = False
    max_body_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    max_beams: int = 8
    grace_s: float = 60.0  # how long SIGTERM waits for requests in flight


# ---------------------------------------------------------------------------------------------
# Images


@dataclass
class Picture:
    image: Any  # upright RGB PIL image
    digest: str  # sha256 of the bytes: requests showing the same bytes share one vision-tower pass
    path: str | None = None


def read_image(url: Any, settings: ApiSettings, param: str) -> Picture:
    """A ``data:`` URL (base64 PNG/JPEG/WebP) or, with ``--allow-local-files``, a local path → an upright RGB image.

    The pixel count is checked from the header, before any pixel is decoded (decompression bombs)."""
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, f"'{param}' must be a data: URL (data:image/png;base64,...)", "invalid_image", param)
    url = url.strip()
    path = None
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        mime = head[5:].split(";")[0].strip().lower()
        if mime not in IMAGE_TYPES:
            raise ApiError(415, f"unsupported image type '{mime or '?'}': send PNG, JPEG or WebP",
                           "unsupported_image_type", param)
        if ";base64" not in head.lower():
            raise ApiError(400, "the data: URL must be base64 (data:image/png;base64,...)", "invalid_image", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data: URL's base64 does not decode", "invalid_image", param) from None
    elif url.split(":", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs"):
        raise ApiError(400, "this server never fetches URLs: send the image as a data: URL (base64)",
                       "remote_url_refused", param)
    else:
        if not settings.allow_local_files:
            raise ApiError(400, "local files are off (start the server with --allow-local-files): send a data: URL",
                           "local_files_disabled", param)
        path = url[7:] if url.startswith("file://") else url
        try:
            data = Path(path).expanduser().read_bytes()
        except OSError as exc:
            raise ApiError(400, f"cannot read '{path}': {exc.strerror or exc}", "invalid_image", param) from None
    return Picture(_decode(data, settings, param), hashlib.sha256(data).hexdigest(), path)


def _decode(data: bytes, settings: ApiSettings, param: str) -> Any:
    from PIL import Image, ImageOps

    from florence_kit.data.dataset import to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            handle = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ApiError(400, "the image has too many pixels", "image_too_large", param) from None
        except Exception:
            raise ApiError(400, "the image cannot be read (not a PNG, JPEG or WebP file?)", "invalid_image",
                           param) from None
        if handle.format not in ALLOWED_FORMATS:
            raise ApiError(415, f"unsupported image type {handle.format or '?'}: send PNG, JPEG or WebP",
                           "unsupported_image_type", param)
        width, height = handle.size
        if width * height > settings.max_image_pixels:
            raise ApiError(400, f"the image is {width}x{height} pixels, more than the {settings.max_image_pixels} "
                           "this server accepts", "image_too_large", param)
        try:
            return to_rgb(ImageOps.exif_transpose(handle))
        except Exception as exc:
            raise ApiError(400, f"the image cannot be decoded ({type(exc).__name__}: truncated or damaged?)",
                           "invalid_image", param) from None


# ---------------------------------------------------------------------------------------------
# Tasks and prompts


@dataclass
class Job:
    """One request for the batcher: what to ask of which image, and where the answer goes."""

    spec: TaskSpec
    prompt: str
    picture: Picture
    max_new_tokens: int
    num_beams: int
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)

    def decoding(self) -> str:
        """The generation settings, as a key: jobs with the same one are generated together, whatever the task."""
        settings = {**self.spec.generation, "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        return json.dumps(settings, sort_keys=True, default=str)


class Engine:
    """One loaded model: tasks, prompts, token counts, and the batcher that answers."""

    def __init__(self, model: Any, processor: Any, tasks: dict[str, TaskSpec], settings: ApiSettings) -> None:
        from florence_kit.common.geometry import ensure_parse_config
        from florence_kit.evaluate.generation import position_limit

        ensure_parse_config(processor)  # tiny checkpoints lack a post-processing config
        self.model, self.processor, self.tasks, self.settings = model, processor, tasks, settings
        self.limit = position_limit(model)
        if settings.default_task not in tasks:
            raise UserError(f"unknown task '{settings.default_task}'")
        self.batcher = Batcher(self, settings.max_batch, settings.batch_window_ms / 1000)

    # --- which task a request means ---

    def by_token(self, token: str) -> TaskSpec | None:
        """The task whose prompt starts with a Florence-2 token such as ``<OD>``: the default task first."""
        default = self.tasks[self.settings.default_task]
        if task_token(default.prompt) == token:
            return default
        return next((s for s in self.tasks.values() if task_token(s.prompt) == token), None)

    def resolve(self, text: str, task: str | None, question: str | None,
                box: Any) -> tuple[TaskSpec, str | None, Any]:
        """(task, question, box) from a chat text part: a task name, a prompt starting with a task token
        (``<OD>``, ``<DocVQA>What is the total?``), or a question for the default task; ``task`` picks one by name."""
        text = (text or "").strip()
        if task is not None:
            if task not in self.tasks:
                raise self.unknown(task, "task")
            return self.tasks[task], question if question is not None else (text or None), box
        if text in self.tasks:
            return self.tasks[text], question, box
        token = task_token(text)
        if token:
            spec = self.by_token(token)
            if spec is None:
                raise self.unknown(token, "messages")
            rest = text[len(token):].strip() or None
            if "region" in template_fields(spec.prompt):
                return spec, question, box if box is not None else rest
            return spec, question if question is not None else rest, box
        if not text:
            raise ApiError(400, "the user message needs a text part: a task name, a task prompt such as <OD>, or a "
                           "question", "missing_text", "messages")
        spec = self.tasks[self.settings.default_task]
        if not [f for f in template_fields(spec.prompt) if f != "region"]:
            raise self.unknown(text, "messages")
        return spec, text, box

    def unknown(self, name: str, param: str) -> ApiError:
        import difflib

        close = difflib.get_close_matches(name, list(self.tasks), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (GET /v1/models lists the tasks)"
        return ApiError(400, f"unknown task '{name[:80]}'{hint}; send a task name, a task prompt such as <OD>, or a "
                        f"question for the default task '{self.settings.default_task}'", "unknown_task", param)

    def prompt(self, spec: TaskSpec, question: str | None, box: Any, size: tuple[int, int]) -> str:
        from florence_kit.evaluate.region_answers import render_prompt

        if isinstance(box, (list, tuple)):
            box = ",".join(str(v) for v in box)
        if box is not None and not isinstance(box, str):
            raise ApiError(400, "'box' must be \"x1,y1,x2,y2\" or four numbers (pixels of the image)", "invalid_box",
                           "box")
        try:
            return render_prompt(spec, (question or "").strip() or None, box, size, question_flag="a question",
                                 box_flag="'box'")
        except UserError as exc:
            param = "box" if "box" in str(exc) else "messages"
            raise ApiError(400, str(exc), "invalid_box" if param == "box" else "missing_question", param) from None

    def lengths(self, spec: TaskSpec, max_tokens: Any, num_beams: Any) -> tuple[int, int]:
        """(max_new_tokens, num_beams): the request's, else the task's; past the model's limits → 400."""
        settings = {"max_new_tokens": 64, "num_beams": 1, **spec.generation}
        for name, value, top in (("max_tokens", max_tokens, self.limit), ("num_beams", num_beams,
                                                                         self.settings.max_beams)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ApiError(400, f"'{name}' must be a whole number of at least 1", "invalid_value", name)
            if value > top:
                what = (f"this model's decoder has {top} positions" if name == "max_tokens"
                        else f"this server allows {top} beams at most")
                raise ApiError(400, f"'{name}' {value} is more than {top}: {what}", "invalid_value", name)
        return (min(int(max_tokens or settings["max_new_tokens"]), self.limit),
                int(num_beams or settings["num_beams"]))

    def prompt_tokens(self, prompt: str) -> int:
        from florence_kit.evaluate.generation import prompt_lengths

        return prompt_lengths(self.processor, [prompt])[0] + 2 + int(getattr(self.processor, "num_image_tokens", 0))

    def pieces(self, text: str) -> list[str]:
        """``text`` cut at its token boundaries (the stream's deltas; joined they are ``text`` exactly)."""
        if not text:
            return []
        try:
            offsets = self.processor.tokenizer(text, add_special_tokens=False,
                                               return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):
            return [text]
        cuts = sorted({end for _, end in offsets if 0 < end < len(text)})
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def answer_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    async def ask(self, spec: TaskSpec, prompt: str, picture: Picture, max_new_tokens: int, num_beams: int) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(spec, prompt, picture, max_new_tokens, num_beams, loop.create_future(), loop)
        self.batcher.put(job)
        return await job.future


class Batcher:
    """One thread that answers jobs in batches: what queued while the model was busy is taken at once; a batch
    that is not full waits up to ``window`` seconds from its first job's arrival for more."""

    def __init__(self, engine: Engine, max_batch: int, window: float) -> None:
        self.engine, self.max_batch, self.window = engine, max(1, max_batch), max(0.0, window)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = self.answered = self.largest = 0
        self.configs: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="florence-kit-batcher", daemon=True)
        self.thread.start()

    def put(self, job: Job) -> None:
        self.queue.put(job)

    def stop(self) -> None:
        self.queue.put(None)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, stop = [first], False
        deadline = first.arrived + self.window
        while len(jobs) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self.queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            self.batches += 1
            groups: dict[str, list[Job]] = {}  # one generate call per generation setting, whatever the tasks
            for job in jobs:
                groups.setdefault(job.decoding(), []).append(job)
            for key, group in groups.items():
                self.largest = max(self.largest, len(group))
                self._answer(key, group)
            if stop:
                return

    def _answer(self, key: str, jobs: list[Job]) -> None:
        """One generate call for ``jobs`` (one generation setting, any tasks); each answer parsed by its own task,
        with :func:`parse_answer` as ``answer_requests`` parses a task's answers."""
        from florence_kit.evaluate.batch import Answer, ImageRef, Request, answer_requests
        from florence_kit.evaluate.generation import generation_config_for
        from florence_kit.evaluate.region_answers import parse_answer

        engine = self.engine
        try:
            if key not in self.configs:
                self.configs[key] = generation_config_for(jobs[0].spec, engine.model, engine.processor,
                                                          max_new_tokens=jobs[0].max_new_tokens,
                                                          num_beams=jobs[0].num_beams)
            rows = [{"image": job.picture.image} for job in jobs]
            requests = [Request(i, ImageRef(str(i), row=i, page=job.picture.digest), job.prompt)
                        for i, job in enumerate(jobs)]
            plain = dataclasses.replace(jobs[0].spec, regions=None)  # texts back; each job's task parses its own
            results: dict[int, Any] = {}
            for batch in answer_requests(engine.model, engine.processor, plain, requests, self.configs[key],
                                         rows=rows, batch_size=len(requests)):
                for result in batch:
                    job = jobs[result.index]
                    if isinstance(result, Answer) and job.spec.regions:
                        result.parsed = parse_answer(job.spec, engine.processor, result.text,
                                                     (result.width, result.height))
                    results[result.index] = result
            for i, job in enumerate(jobs):
                _settle(job, results.get(i, RuntimeError("no answer came back")))
            self.answered += len(jobs)
        except UserError as exc:  # e.g. a question longer than the encoder's positions
            for job in jobs:
                _settle(job, ApiError(400, str(exc), "invalid_request", "messages"))
        except Exception as exc:  # the server keeps answering; this batch's callers hear why
            for job in jobs:
                _settle(job, ApiError(500, f"generation failed: {type(exc).__name__}: {exc}"[:300], "server_error",
                                      kind="server_error"))


def _settle(job: Job, outcome: Any) -> None:
    def done() -> None:
        if job.future.done():
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    job.loop.call_soon_threadsafe(done)


# ---------------------------------------------------------------------------------------------
# HTTP


def _error(exc: ApiError) -> Any:
    from starlette.responses import JSONResponse

    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _json_body(request: Any, settings: ApiSettings) -> dict[str, Any]:
    limit = int(settings.max_body_mb * 1024 * 1024)
    declared = request.headers.get("content-length") or ""
    declared_n = int(declared) if declared.isdigit() else 0
    chunks, size = [], 0
    async for chunk in request.stream():
        # a body over the limit is read to its end (up to DISCARD_BYTES) and dropped, so that a client which sends
        # all of it before reading hears the 413 instead of a broken pipe
        size += len(chunk)
        if max(size, declared_n) > limit:
            chunks = []
            if size > DISCARD_BYTES:
                break
            continue
        chunks.append(chunk)
    if max(size, declared_n) > limit:
        raise ApiError(413, f"the request body is {max(size, declared_n)} bytes, more than the {limit} this "
                       "server accepts (--max-body-mb)", "body_too_large")
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({str(exc).splitlines()[0][:120]})", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", "invalid_json")
    return body


def _user_parts(body: dict[str, Any]) -> tuple[str, Any]:
    """(text, image url) of the last user message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a list holding a user message", "missing_messages", "messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ApiError(400, "'messages' holds no user message", "missing_messages", "messages")
    content = users[-1].get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, "the user message's 'content' must be a list of parts", "invalid_content", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        else:
            raise ApiError(400, f"unsupported content part {str(kind or part)[:40]!r}: send 'text' and 'image_url' "
                           "parts", "invalid_content", "messages")
    if len(images) != 1:
        raise ApiError(400, f"the user message needs exactly one image_url part (it has {len(images)})",
                       "missing_image" if not images else "too_many_images", "messages")
    return " ".join(t.strip() for t in texts).strip(), images[0]


def _florence(spec: TaskSpec, prompt: str, picture: Picture, answer: Any) -> dict[str, Any]:
    return {"task": spec.name, "prompt": prompt, "width": answer.width, "height": answer.height,
            "text": answer.text, "answer": answer.parsed if spec.regions else None}


def content_of(spec: TaskSpec, answer: Any) -> str:
    """The message content: the answer text, or for region tasks the parsed regions as JSON (``predict``'s line)."""
    if spec.regions and not isinstance(answer.parsed, str):
        return json.dumps(answer.parsed, ensure_ascii=False)
    return answer.parsed if isinstance(answer.parsed, str) else answer.text


def build_app(engine: Engine, settings: ApiSettings | None = None) -> Any:
    """The Starlette app (routes, errors in OpenAI's shape, auth, and the 503 of a server shutting down);
    ``settings`` replaces the engine's limits and key for this app (batching stays the engine's)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    settings = settings or engine.settings
    state = ServerState()

    async def read_picture(url: Any, param: str) -> Picture:
        return await run_in_threadpool(read_image, url, settings, param)

    async def answer(spec: TaskSpec, question: str | None, box: Any, url: Any, param: str, max_tokens: Any,
                     num_beams: Any) -> tuple[str, Picture, Any, int]:
        new_tokens, beams = engine.lengths(spec, max_tokens, num_beams)
        picture = await read_picture(url, param)
        prompt = engine.prompt(spec, question, box, picture.image.size)
        result = await engine.ask(spec, prompt, picture, new_tokens, beams)
        from florence_kit.evaluate.batch import Unreadable

        if isinstance(result, Unreadable):
            raise ApiError(400, f"the image cannot be read: {result.reason}", "invalid_image", param)
        return prompt, picture, result, new_tokens

    async def chat(request: Any) -> Any:
        body = await _json_body(request, settings)
        text, url = _user_parts(body)
        temperature = body.get("temperature")
        if temperature not in (None, 0, 0.0) or isinstance(temperature, bool):
            raise ApiError(400, "only 'temperature' 0 is supported: answers are greedy (or beam search through "
                           "'num_beams')", "invalid_value", "temperature")
        if body.get("n") not in (None, 1):
            raise ApiError(400, "'n' must be 1", "invalid_value", "n")
        task, question, box = body.get("task"), body.get("question"), body.get("box")
        if task is not None and not isinstance(task, str) or question is not None and not isinstance(question, str):
            raise ApiError(400, "'task' and 'question' must be strings", "invalid_value", "task")
        spec, question, box = engine.resolve(text, task, question, box)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        prompt, picture, result, new_tokens = await answer(spec, question, box, url, "messages", max_tokens,
                                                           body.get("num_beams"))
        content = content_of(spec, result)
        made = engine.answer_tokens(result.text)
        usage = {"prompt_tokens": engine.prompt_tokens(prompt), "completion_tokens": made,
                 "total_tokens": engine.prompt_tokens(prompt) + made}
        finish = "length" if made + 1 >= new_tokens else "stop"  # no room left for the end token: cut short
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        florence = _florence(spec, prompt, picture, result)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(ident, created, settings.model_name, engine.pieces(content), finish,
                                             florence, usage if include_usage else None),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage, "florence": florence})

    async def predict(request: Any) -> Any:
        from florence_kit.evaluate.corpus import answer_record

        body = await _json_body(request, settings)
        name = body.get("task", settings.default_task)
        if not isinstance(name, str) or name not in engine.tasks:
            raise engine.unknown(str(name), "task")
        spec = engine.tasks[name]
        question = body.get("question")
        if question is not None and not isinstance(question, str):
            raise ApiError(400, "'question' must be a string", "invalid_value", "question")
        if "image" not in body:
            raise ApiError(400, "'image' is missing: a data: URL (or a local path with --allow-local-files)",
                           "missing_image", "image")
        prompt, picture, result, _ = await answer(spec, question, body.get("box"), body["image"], "image",
                                                  body.get("max_new_tokens"), body.get("num_beams"))
        key = picture.path or f"sha256:{picture.digest}"
        fields = template_fields(spec.prompt)
        label = spec.prompt.format(**{f: question for f in fields}) if fields and question is not None \
            and "region" not in fields else spec.prompt
        return JSONResponse(answer_record({"key": key, "path": picture.path}, result,
                                          {"model": settings.model_name, "task": spec.name, "prompt": label}, prompt))

    async def models(request: Any) -> Any:
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": state.started, "owned_by": "florence-kit",
            "florence": {"default_task": settings.default_task,
                         "tasks": {name: spec.prompt for name, spec in engine.tasks.items()},
                         "max_tokens": engine.limit}}]})

    async def health(request: Any) -> Any:
        b = engine.batcher
        return JSONResponse({"status": "draining" if state.draining else "ok", "model": settings.model_name,
                             "in_flight": state.in_flight, "answered": b.answered, "batches": b.batches,
                             "largest_batch": b.largest, "max_batch": b.max_batch,
                             "batch_window_ms": settings.batch_window_ms},
                            status_code=503 if state.draining else 200)

    def guarded(handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def run(request: Any) -> Any:
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc)

        return run

    async def http_error(request: Any, exc: HTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no route {request.url.path} (see GET /v1/models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error(ApiError(exc.status_code, message, code))

    routes = [Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
              Route("/v1/florence/predict", guarded(predict), methods=["POST"]),
              Route("/v1/models", guarded(models), methods=["GET"]),
              Route("/health", guarded(health), methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return Gate(app, settings, state)


async def _stream(ident: str, created: int, model: str, pieces: list[str], finish: str, florence: dict[str, Any],
                  usage: dict[str, int] | None) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI's clients read them: a role chunk, one chunk per token, the finish, [DONE]."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for piece in pieces:
        yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}], florence=florence)
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


@dataclass
class ServerState:
    started: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    draining: bool = False


class Gate:
    """ASGI middleware: the API key (401), the 503 of a server shutting down, and the count of requests in flight
    (a streamed answer counts until its last event is sent)."""

    def __init__(self, app: Any, settings: ApiSettings, state: ServerState) -> None:
        self.app, self.settings, self.state = app, settings, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request

        if self.state.draining and scope["path"] != "/health":
            await _error(ApiError(503, "the server is shutting down", "shutting_down", kind="server_error"))(
                scope, receive, send)
            return
        key = self.settings.api_key
        if key and scope["path"] != "/health":
            given = Request(scope).headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                await _error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key",
                                      kind="authentication_error"))(scope, receive, send)
                return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


# ---------------------------------------------------------------------------------------------
# Running it


def make_server(app: Any, host: str, port: int, grace_s: float = 60.0) -> Any:
    """A uvicorn server whose SIGTERM/Ctrl+C drains: new requests get 503, those in flight finish, then it stops
    (a second signal stops at once)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining:
                self.should_exit = self.force_exit = True
                return
            app.state.draining = True
            threading.Thread(target=self._drain, daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + grace_s
            while app.state.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=grace_s)
    return Server(config)


def serve_api(model_path: str, task: str, host: str, port: int, tasks_dirs: list | None = None,
              print_fn: Any = print, attn: str = "auto", **options: Any) -> None:
    """Load the model and serve the API until SIGTERM or Ctrl+C (``options``: :class:`ApiSettings` fields)."""
    from florence_kit.model.loading import load_for_generation
    from florence_kit.tasks.registry import all_tasks, get_task

    default = get_task(task, tasks_dirs or []).name  # an unknown --task fails before the model loads
    settings = ApiSettings(model_name=str(model_path), default_task=default, **options)
    check_settings(settings)
    tasks = dict(all_tasks(tasks_dirs or []))
    model, processor = load_for_generation(model_path, attn)
    engine = Engine(model, processor, tasks, settings)
    server = make_server(build_app(engine), host, port, settings.grace_s)
    print_fn(f"serving {model_path} as an OpenAI-compatible API on http://{host}:{port}/v1 (SIGTERM or Ctrl+C stops "
             "after the requests in flight)")
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise UserError(f"cannot listen on {host}:{port}; choose another --port") from None
    finally:
        engine.batcher.stop()


def check_settings(settings: ApiSettings) -> None:
    """The command's options, refused in one line before the model loads."""
    if settings.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {settings.max_batch}")
    if settings.batch_window_ms < 0:
        raise UserError(f"--batch-window-ms must be 0 or more, got {settings.batch_window_ms}")
    if settings.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be more than 0, got {settings.max_body_mb}")
    if settings.api_key is not None and not settings.api_key.strip():
        raise UserError("--api-key is empty")
